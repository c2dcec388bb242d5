"""A second, exact look at what math-verify calls equal (runs inside the verify workers).

math-verify compares two non-atomic numeric expressions by evaluating their difference to 15
digits with small values chopped to zero, so values that differ below that resolution come
out equal: 10^{-20} and 10^{-20} + 10^{-40}, \\sqrt{10^{40} + 1} and 10^{20},
\\ln(10^{20} + 1) and \\ln(10^{20}). A policy can find such answers. When math-verify says
equal, this check decides again where the numbers allow an exact answer:

  * both sides exact (no decimal written anywhere): equal only if their difference is exactly
    zero: rationals compared as rationals, otherwise the simplified difference must be 0, or,
    when it cannot be simplified to a number, must vanish when evaluated to 100 digits;
  * a decimal on either side: the decimals are taken at face value (the exact number written)
    and must lie within math-verify's own tolerance, 10^{-6} (its rounding to 6 places), of
    the other side; 1/3 vs 0.333333 stays right, 2^{70} vs a decimal off by 0.5 does not;
  * tuples, sets and intervals: the same, element by element; anything else (symbols,
    relations, matrices) keeps math-verify's verdict.
"""

from __future__ import annotations

_DIGITS = 100
_FLOAT_TOLERANCE = "1e-6"


def _numeric(expr) -> bool:
    import sympy

    return isinstance(expr, sympy.Expr) and expr.is_number is True and not expr.has(sympy.zoo, sympy.nan)


def _exact_of_decimals(expr):
    """The expression with each Float replaced by the exact decimal it was written as."""
    import sympy

    floats = expr.atoms(sympy.Float)
    return expr.xreplace({f: sympy.Rational(str(f)) for f in floats}), bool(floats)


def _differs(gold, answer) -> bool | None:
    """True: the two numbers differ; False: equal; None: cannot tell (keep math-verify's verdict)."""
    import sympy

    if not (_numeric(gold) and _numeric(answer)):
        return None
    g, g_dec = _exact_of_decimals(gold)
    a, a_dec = _exact_of_decimals(answer)
    if g_dec or a_dec:
        try:
            gap = abs(sympy.N(g - a, 30))
            return bool(gap > sympy.Rational(_FLOAT_TOLERANCE))
        except (TypeError, ValueError, ArithmeticError):
            return None
    if g.is_Rational and a.is_Rational:
        return g != a
    try:
        d = sympy.simplify(g - a)
    except Exception:  # sympy raises many kinds on exotic input
        return None
    if d == 0:
        return False
    if d.is_Rational:
        return True
    try:
        scale = max(abs(sympy.N(g, 30)), abs(sympy.N(a, 30)), sympy.Integer(1))
        v = sympy.N(d, _DIGITS)
        return bool(abs(v) > scale * sympy.Rational(1, 10 ** (_DIGITS - 10)))
    except (TypeError, ValueError, ArithmeticError):
        return None


def exact_disagreement(gold, answer) -> str | None:
    """Why two expressions math-verify called equal are not equal, or None."""
    import sympy

    if isinstance(gold, (sympy.Tuple, tuple)) and isinstance(answer, (sympy.Tuple, tuple)):
        if len(gold) != len(answer):
            return None
        for g, a in zip(gold, answer):
            why = exact_disagreement(g, a)
            if why:
                return why
        return None
    if isinstance(gold, sympy.FiniteSet) and isinstance(answer, sympy.FiniteSet):
        left = list(answer.args)
        for g in gold.args:  # each gold element needs an answer element not known to differ
            match = next((a for a in left if _differs(g, a) is not True), None)
            if match is None:
                return f"no element of the answer equals {g} exactly"
            left.remove(match)
        return None
    if isinstance(gold, sympy.Interval) and isinstance(answer, sympy.Interval):
        for g, a in ((gold.start, answer.start), (gold.end, answer.end)):
            if _differs(g, a):
                return f"interval end {a} is not exactly {g}"
        return None
    if _differs(gold, answer):
        return "equal only to floating-point resolution, not exactly"
    return None
