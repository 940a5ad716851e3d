"""The rubric library: YAML files only (package data). Loaded by `rlaif.judge.rubric.load_rubric`."""
