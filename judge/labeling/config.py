"""Job configurations for `rlaif label` and `rlaif best-of-n` (pydantic, validated at the boundary).

Each field is documented once here; the CLI help and the dataset card reuse these
descriptions. Fields fall in two groups, and the split is what makes resuming safe:

- fields that decide *what is generated and judged* (policy, sampling, n, pairs, rubric,
  engine, seed, batch size, the prompts themselves) form the job's identity; a restart with
  any of them changed is refused (see `ProgressStore.check_identity`);
- fields applied only when the dataset is written (filters, output format, exports, cache
  location, progress bar) are in `UNHASHED` and may change between runs: re-running a
  finished job with another `--min-margin` just re-filters the stored judgments.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Export = Literal["jsonl", "parquet"]
PairStrategy = Literal["best-worst", "all", "random"]
Ranking = Literal["wins", "score", "checklist"]
Selection = Literal["score", "tournament"]
PromptFormat = Literal["conversational", "standard"]


class _JobConfig(BaseModel):
    """Settings shared by both jobs: the prompt source, the policy sampler and the judge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    UNHASHED: ClassVar[frozenset[str]] = frozenset(
        {"out", "prompts", "export", "cache_path", "no_cache", "overwrite", "progress", "api_key", "request_batch_size",
         "timeout"})

    prompts: Path = Field(description="Prompt source: a jsonl/json/parquet/csv file or a `save_to_disk` directory.")
    out: Path = Field(description="Output directory: dataset, exports, card, progress store and judgment cache.")
    prompt_column: str | None = Field(None, description="Field (or path such as `turns[0]`) holding the prompt; "
                                                        "default: `turns[0]`, `instruction` or `prompt`, whichever exists.")
    limit: int | None = Field(None, ge=1, description="Use only the first N usable prompts.")
    policy: str = Field("default", description="Engine spec of the policy that samples responses.")
    temperature: float = Field(0.8, ge=0.0, le=5.0, description="Policy sampling temperature (> 0 when n > 1).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Policy nucleus sampling.")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Length cap of each sampled response.")
    seed: int = Field(0, description="Base seed: batch i samples with a seed derived from (seed, i); also the judge's seed.")
    batch_size: int = Field(16, ge=1, le=4096, description="Prompts per batch; a batch is the unit that is generated, judged "
                                                            "and persisted together.")
    rubric: str | None = Field(None, description="Judge rubric (built-in id or YAML file); default depends on the job.")
    mode: Literal["logprob", "cot"] = Field("logprob", description="Judge mode: label log-probs, or rationale then label.")
    engine: str = Field("default", description="Engine spec of the in-process judge (ignored with judge_url).")
    judge_url: str | None = Field(None, description="Base URL of a running `rlaif serve` judge; used instead of an "
                                                    "in-process judge.")
    api_key: str | None = Field(None, description="Bearer key for judge_url (never stored on disk).", repr=False)
    request_batch_size: int = Field(32, ge=1, le=4096, description="Items per HTTP request to the judge service.")
    timeout: float = Field(600.0, gt=0, description="HTTP timeout per judge-service request, seconds.")
    cache_path: Path | None = Field(None, description="Judgment cache file (default: <out>/judgments.sqlite).")
    no_cache: bool = Field(False, description="Do not use a judgment cache (stages are still persisted).")
    export: tuple[Export, ...] = Field(("jsonl", "parquet"), description="Flat exports written next to the saved dataset.")
    overwrite: bool = Field(False, description="Discard an existing job in `out` instead of resuming it.")
    progress: bool = Field(True, description="Show a tqdm progress bar on stderr.")

    @field_validator("policy", "engine")
    @classmethod
    def _engine_spec(cls, spec: str) -> str:
        from rlaif.judge.engines import parse_engine_spec

        parse_engine_spec(spec)  # raises ValueError listing the accepted forms
        return spec

    @field_validator("judge_url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"judge_url must start with http:// or https://, got {url!r}")
        return url.rstrip("/") if url else url

    def identity(self, **extra: object) -> dict[str, object]:
        """Everything that determines the stored responses and judgments (see module docstring)."""
        fields = self.model_dump(mode="json", exclude=set(self.UNHASHED))
        if self.judge_url is not None:
            fields.pop("engine")  # the service decides its engine; its model shows in every judgment
        if fields.get("answer_column", "") is None:
            fields.pop("answer_column")  # added later: jobs without reference answers keep their identity
        if fields.get("ranking") != "checklist":  # added later: only checklist-ranked jobs depend on these
            for name in ("criteria_column", "checklist_mode", "checklist_rubric"):
                fields.pop(name, None)
        return {"job": self.job_name, **fields, **extra}

    job_name: ClassVar[str] = "job"

    def _check_sampling(self, n: int) -> None:
        if n > 1 and self.temperature == 0:
            raise ValueError(f"n={n} samples need temperature > 0: greedy decoding would return the same text {n} times")


class LabelConfig(_JobConfig):
    """`rlaif label`: sample N responses per prompt, judge pairs, write a TRL preference dataset."""

    job_name: ClassVar[str] = "label"
    # `calibration` enters the identity as the calibration's content id (`run_label`), not as a path.
    UNHASHED: ClassVar[frozenset[str]] = _JobConfig.UNHASHED | {"min_margin", "drop_inconsistent", "format",
                                                                "calibration"}

    n: int = Field(4, ge=2, le=64, description="Responses sampled per prompt.")
    pairs: PairStrategy = Field("best-worst", description="best-worst: one pair per prompt, the top- and bottom-ranked "
                                                          "samples; all: every pair; random: one seeded random pair.")
    ranking: Ranking = Field("wins", description="How best-worst ranks the N samples: wins = round robin of pairwise "
                                                 "judgments (soft wins); score = the score judge; checklist = each "
                                                 "prompt's own criteria (criteria_column), weighted mean P(yes).")
    score_rubric: str = Field("score-1-10", description="Score rubric used by ranking=score.")
    criteria_column: str = Field("criteria", description="ranking=checklist: source column holding each prompt's "
                                                         "checklist, a list of texts or {text, weight} objects.")
    checklist_mode: Literal["explicit", "implicit"] = Field("explicit", description=(
        "ranking=checklist: explicit = one yes/no question per criterion; implicit = the whole checklist in one "
        "score prompt."))
    checklist_rubric: str | None = Field(None, description="ranking=checklist: rubric id or YAML file (default: "
                                                           "checklist, or checklist-implicit for implicit mode).")
    tie_margin: float = Field(0.05, ge=0.0, lt=0.5, description="In-process judge: |P - 0.5| below this is a tie.")
    responses_from: tuple[str, ...] | None = Field(None, description="Relabel existing responses read from these source "
                                                                     "columns instead of sampling (n = their count).")
    answer_column: str | None = Field(None, description="Source column holding each prompt's reference answer, shown to "
                                                        "reference-guided rubrics (e.g. --rubric correctness-pairwise).")
    min_margin: float = Field(0.0, ge=0.0, le=1.0, description="Drop pairs whose judge margin |2P - 1| is below this.")
    drop_inconsistent: bool = Field(False, description="Drop pairs whose two presentation orders disagree.")
    format: PromptFormat = Field("conversational", description="conversational: prompt/chosen/rejected as chat messages "
                                                               "(TRL applies the chat template); standard: plain strings.")
    calibration: Path | None = Field(None, description="Calibration file (`rlaif calibrate`) for the in-process pairwise "
                                                       "judge; a judge service applies its own (`rlaif serve --calibration`).")

    @field_validator("responses_from")
    @classmethod
    def _columns(cls, columns: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if columns is None:
            return None
        columns = tuple(c.strip() for c in columns if c.strip())
        if len(columns) < 2 or len(set(columns)) != len(columns):
            raise ValueError(f"responses_from needs at least two distinct columns, e.g. 'chosen,rejected'; got {list(columns)}")
        return columns

    @model_validator(mode="after")
    def _consistent(self) -> LabelConfig:
        if self.responses_from is not None:
            object.__setattr__(self, "n", len(self.responses_from))
        else:
            self._check_sampling(self.n)
        if self.calibration is not None and self.judge_url is not None:
            raise ValueError("calibration applies to the in-process judge; a judge service calibrates with its own "
                             "`rlaif serve --calibration FILE`")
        if self.ranking in ("score", "checklist") and self.pairs != "best-worst":
            raise ValueError(f"ranking={self.ranking} only applies to pairs=best-worst (pairs={self.pairs} needs no "
                             "ranking)")
        return self

    @property
    def ranking_rubric(self) -> str | None:
        """The rubric that ranks the N samples of best-worst (None for ranking=wins: the pairwise rubric does)."""
        if self.ranking == "score":
            return self.score_rubric
        if self.ranking == "checklist":
            from rlaif.judge.checklist import DEFAULT_CHECKLIST_RUBRICS

            return self.checklist_rubric or DEFAULT_CHECKLIST_RUBRICS[self.checklist_mode]
        return None

    @property
    def pairwise_rubric(self) -> str:
        return self.rubric or "helpfulness"


class BestOfNConfig(_JobConfig):
    """`rlaif best-of-n`: rejection sampling (LLaMA-2 §3.2.2): sample N, keep the judge's favourite."""

    job_name: ClassVar[str] = "best-of-n"
    UNHASHED: ClassVar[frozenset[str]] = _JobConfig.UNHASHED | {"min_score"}

    n: int = Field(8, ge=2, le=64, description="Responses sampled per prompt.")
    selection: Selection = Field("score", description="score: highest direct score (ScoreJudge); tournament: "
                                                      "single-elimination bracket of pairwise judgments.")
    min_score: float | None = Field(None, ge=0.0, le=1.0, description="Drop prompts whose winner's judge score is below this.")

    @model_validator(mode="after")
    def _consistent(self) -> BestOfNConfig:
        self._check_sampling(self.n)
        return self

    @property
    def selection_rubric(self) -> str:
        return self.rubric or ("score-1-10" if self.selection == "score" else "helpfulness")
