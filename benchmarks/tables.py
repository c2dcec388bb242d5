"""Markdown tables from benchmark rows (dicts with a "section" key), printed last so that the
end of a device call's output carries them."""


def print_tables(rows: list[dict], sections: tuple[str, ...]) -> None:
    for section in sections:
        chosen = [r for r in rows if r["section"] == section]
        if not chosen:
            continue
        keys: list[str] = []
        for r in chosen:
            keys += [k for k in r if k not in keys and k != "section"]
        print(f"\n## {section}\n| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
        for r in chosen:
            print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
