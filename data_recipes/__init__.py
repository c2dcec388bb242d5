"""Dataset builders: prompt sets, distillation filters, SFT mixtures, packing, preference pairs."""
