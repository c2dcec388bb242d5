"""Stages: thin compositions of data_recipes, reward, engines and train over the model core."""
