"""The judge service's wire contract: request/response models (`protocol`) and the httpx client (`client`).

Below the service in the layers because the labeling jobs (`rlaif.judge.labeling`) and the
trainer's HTTP reward both call a running `rlaif serve`; `rlaif.service.protocol` and
`rlaif.service.client` re-export both modules under their old names. Light on purpose:
pydantic, httpx and `rlaif.judge.types` only, never torch.
"""
