"""`rlaif review`: a web page for people to check and correct AI labels (see docs/review.md).

A thin FastAPI layer over `rlaif.judge.labeling.review` (sources, the human-label store, agreement,
export); it never imports the trainer.
"""
