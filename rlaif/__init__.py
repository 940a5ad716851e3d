"""rlaif: the command-line entry point tying the judge, the service and training together.

The CLI lives in its own thin package because it spans every other one (judge, service,
policy_training); putting it in any of them would invert the dependency direction of
`../DESIGN.md`. Each package contributes its commands through a `register(app)` function.
"""

__version__ = "0.1.0"
