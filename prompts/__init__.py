"""The rubric library: YAML files only (package data). Loaded by `judge.rubric.load_rubric`."""
