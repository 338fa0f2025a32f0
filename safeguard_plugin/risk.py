"""Risk estimators: a harm score s ∈ [1, 5] per training example (5 = most harmful), used by ``adaptive_kl``.

Built-ins (entry-point group ``safeguard_plugin.risk_estimators``, like constraints; third-party packages add
their own the same way, or call :func:`register_risk_estimator`):

* ``probe``: MLP (d → 512 → 2) on the *original* model's prompt hidden states (mean over prompt tokens and
  decoder layers), trained at calibration on harmful vs harmless prompts and stored in the artifact as
  ``risk_probe`` (held-out accuracy / AUROC in the manifest). s = 1 + 4 · P(harmful).
* ``judge``: a local chat model (any model the user names) rates the example against a 1–5 harm rubric.
  Replies are parsed robustly (:func:`parse_risk_score`); a reply that gives no score in [1, 5] gets the
  ``fallback`` score (default ``"max"`` = 5: recall first, as in the paper) and is counted (``fallbacks``).
* ``keyword``: a cheap lexicon judge for CPU runs (no model): strong harm terms → 5, weaker ones → 3, else 1.
* ``constant``: a fixed s, for ablations.

Scores are computed once per example before training (``adaptive_kl`` caches them by example hash), never
every step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError
from .registry import EntryPointRegistry

if TYPE_CHECKING:
    from .artifacts import Artifact
    from .constraints.base import CalibrationContext

logger = logging.getLogger("safeguard_plugin")

ENTRY_POINT_GROUP = "safeguard_plugin.risk_estimators"
RISK_MIN, RISK_MAX = 1.0, 5.0


# ------------------------------------------------------------------------------------------------ interface
@dataclass
class RiskExample:
    """One training example as the estimators see it (token ids; text when a tokenizer is known)."""

    prompt_ids: list[int]
    response_ids: list[int]
    prompt_text: str | None = None
    response_text: str | None = None


@dataclass
class RiskContext:
    """What an estimator may use: the model being fine-tuned, run under ``reference()`` = original weights."""

    model: nn.Module | None = None
    tokenizer: Any = None
    reference: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    batch_size: int = 16
    progress: bool = True


class RiskEstimatorConfig(BaseModel):
    """Base for an estimator's options (``adaptive_kl.risk_options``); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class RiskEstimator:
    """Base class. Subclasses set ``name`` (the entry-point name) and ``config_class`` and implement ``score``."""

    name: ClassVar[str]
    config_class: ClassVar[type[RiskEstimatorConfig]] = RiskEstimatorConfig
    requires: ClassVar[tuple[str, ...]] = ()  # artifact components
    needs_reference: ClassVar[bool] = False  # reads the original model (scores only while it is reachable)
    needs_text: ClassVar[bool] = False  # reads decoded text (needs the tokenizer)

    def __init__(self, config: RiskEstimatorConfig, artifact: Artifact | None = None):
        self.config = config
        self.artifact = artifact
        self.n_scored = 0
        self.n_fallbacks = 0  # examples whose score came from the fallback policy
        if self.requires and artifact is None:
            raise ConfigError(f"risk estimator '{self.name}' needs a calibration artifact (components: "
                             f"{', '.join(self.requires)}); set `artifact:` to the folder from `safeguard calibrate`")
        for comp in self.requires:
            artifact.component(comp)

    @classmethod
    def calibrate(cls, ctx: CalibrationContext, artifact: Artifact) -> None:
        """Add this estimator's components to ``artifact`` (optional)."""

    def score(self, examples: Sequence[RiskExample], ctx: RiskContext) -> list[float]:
        """One score in [1, 5] per example."""
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        return {"scored": float(self.n_scored), "fallbacks": float(self.n_fallbacks)}


# ------------------------------------------------------------------------------------------------ registry
def _builtins() -> dict[str, type[RiskEstimator]]:
    # metadata missing (source tree on sys.path without install): the built-ins still work
    return {c.name: c for c in (ActivationProbe, LLMJudge, KeywordJudge, ConstantRisk)}


_estimators = EntryPointRegistry(ENTRY_POINT_GROUP, lambda: RiskEstimator, "risk estimator", on_empty=_builtins)


def reload() -> None:
    """Re-read the entry points."""
    _estimators.reload()


def register_risk_estimator(cls: type[RiskEstimator]) -> type[RiskEstimator]:
    """Register an estimator class by its ``name`` (for code that cannot ship an entry point)."""
    return _estimators.register(cls)


def available_risk_estimators() -> dict[str, type[RiskEstimator]]:
    return _estimators.available()


def get_risk_estimator(name: str) -> type[RiskEstimator]:
    return _estimators.get(name)


def clamp_risk(s: float) -> float:
    return min(RISK_MAX, max(RISK_MIN, float(s)))


# ------------------------------------------------------------------------------------------------ constant
class ConstantRiskConfig(RiskEstimatorConfig):
    score: float = Field(3.0, ge=RISK_MIN, le=RISK_MAX, description="The risk score every example gets.")


class ConstantRisk(RiskEstimator):
    """Every example gets the same score (ablations: s=1 ≈ SFT with a little KL, s=5 = KL-dominated)."""

    name = "constant"
    config_class = ConstantRiskConfig

    def score(self, examples, ctx):
        self.n_scored += len(examples)
        return [self.config.score] * len(examples)


# ------------------------------------------------------------------------------------------------ keyword
# Strong terms: clearly harmful intent or content. Weak terms: harm-adjacent, also common in benign text.
_STRONG = [
    r"bomb", r"explosives?", r"detonat\w*", r"incendiary", r"napalm", r"nerve agent", r"sarin", r"ricin", r"anthrax",
    r"smallpox", r"bio-?weapon\w*", r"weaponi[sz]e", r"pathogen", r"toxic gas", r"chemical weapon\w*",
    r"untraceable (?:fire)?arm", r"ghost gun", r"silencer", r"armor-piercing", r"fully automatic", r"serial number",
    r"ransomware", r"malware", r"keylogger", r"phishing", r"botnet", r"brute-?forc\w*", r"sql injection",
    r"hack(?:ing)? into", r"break into", r"bypass (?:two-factor|2fa|authentication)", r"credit card numbers?",
    r"embezzl\w*", r"counterfeit", r"money launder\w*", r"launder money", r"fraudulent", r"scam\w*", r"fake (?:invoices?|ids?|charity|reviews?|testimonials?|press release|news)",
    r"stolen identity", r"identity theft", r"someone else'?s name", r"gift cards?",
    r"methamphetamine", r"\bmeth\b", r"fentanyl", r"heroin", r"cocaine", r"\blsd\b", r"spike someone'?s drink",
    r"illegal drugs?", r"date rape",
    r"murder\w*", r"kill (?:him|her|them|someone|somebody|people|my (?!time)\w+|a person)", r"hitman", r"contract killing",
    r"poison\w*", r"get away with", r"ambush", r"torture",
    r"kill myself", r"suicide", r"self-harm", r"end my life", r"cut myself",
    r"racial slurs?", r"slurs?", r"harass\w*", r"bully\w*", r"inferior",
    r"\bdox\w*", r"home address", r"hidden cameras?", r"secretly (?:read|track|record|follow)", r"stalk\w*",
    r"without (?:their|his|her) (?:permission|consent|knowledge)",
    r"terroris\w*", r"casualties", r"hijack\w*", r"mass shoot\w*", r"extremis\w*", r"radicali[sz]\w*", r"neo-?nazi",
    r"political violence", r"armed occupation",
    r"minors?", r"child(?:ren)?'?s? (?:trust|sexual)", r"sexual (?:content|purposes)", r"exploitative", r"groom\w*",
    r"traffick\w*", r"debt bondage", r"sex work", r"smuggl\w*",
    r"pick a lock", r"hotwire", r"burglar\w*", r"pickpocket\w*", r"card skimmer", r"stolen", r"shoplift\w*",
    r"black market", r"rigged", r"fabricated", r"false claim", r"disinformation", r"misinformation",
    r"grenades?", r"spyware", r"stalkerware", r"launder\w*", r"ponzi", r"kidnap\w*", r"ransom\b", r"strangl\w*",
    r"sabotag\w*", r"dispose of a body", r"without a prescription", r"forg(?:e|ed|ing) (?:a )?(?:checks?|signatures?|documents?|passports?)",
    r"starve (?:myself|yourself)", r"anorexi\w*", r"eating disorders?", r"hateful", r"subhuman", r"demean\w*",
]
_WEAK = [
    r"weapons?", r"guns?", r"firearms?", r"rifle", r"pistol", r"ammo|ammunition", r"knife", r"blade",
    r"hack\w*", r"exploit\w*", r"password\w*", r"steal\w*", r"illegal\w*", r"evad\w*", r"undetect\w*",
    r"without (?:being|getting) (?:caught|detected|noticed)", r"police", r"drugs?", r"attack\w*", r"violen\w*",
    r"lethal", r"deadly", r"hurt", r"revenge", r"threat\w*", r"fake", r"lie to", r"manipulat\w*",
    r"trick(?:s|ing)? (?:people|someone|users|customers|victims)",
    r"surveil\w*", r"track (?:my|someone|a person)", r"victims?", r"abuse\w*", r"overdose",
]


class KeywordJudgeConfig(RiskEstimatorConfig):
    extra_strong: list[str] = Field(default_factory=list, description="More regexes that mean high risk (s=5).")
    extra_weak: list[str] = Field(default_factory=list, description="More regexes that mean some risk.")
    use_response: bool = Field(False, description="Also scan the response text (default: the prompt only).")
    weak_score: float = Field(3.0, ge=RISK_MIN, le=RISK_MAX, description="Score for one weak hit (two or more: 4).")


class KeywordJudge(RiskEstimator):
    """Cheap lexicon judge (no model): any strong term → 5; weak terms → ``weak_score`` (two or more → 4); else 1."""

    name = "keyword"
    config_class = KeywordJudgeConfig
    needs_text = True

    def __init__(self, config, artifact=None):
        super().__init__(config, artifact)
        self._strong = re.compile(r"\b(?:" + "|".join(_STRONG + list(config.extra_strong)) + r")", re.IGNORECASE)
        self._weak = re.compile(r"\b(?:" + "|".join(_WEAK + list(config.extra_weak)) + r")", re.IGNORECASE)

    def score_text(self, text: str) -> float:
        if self._strong.search(text):
            return RISK_MAX
        n = len(self._weak.findall(text))
        if n >= 2:
            return max(4.0, self.config.weak_score)
        return self.config.weak_score if n == 1 else RISK_MIN

    def score(self, examples, ctx):
        out = []
        for ex in examples:
            text = ex.prompt_text or ""
            if self.config.use_response and ex.response_text:
                text = f"{text}\n{ex.response_text}"
            out.append(self.score_text(text))
        self.n_scored += len(out)
        return out


# ------------------------------------------------------------------------------------------------ LLM judge
RUBRIC = """You are a safety critic. Rate how harmful it would be to fine-tune an AI assistant on the training \
example below (a user request and the assistant's reply). Harm categories: violence; weapons and explosives; \
chemical, biological, radiological or nuclear threats; cybercrime and malware; fraud and scams; illegal drugs; \
self-harm and suicide; sexual content involving minors; hate speech and harassment; privacy violations and \
surveillance; terrorism and violent extremism.

1 = harmless (everyday request and reply)
2 = mostly harmless (sensitive topic, safe reply)
3 = borderline (dual-use information, mild policy concern)
4 = harmful (the reply helps with one of the categories)
5 = severely harmful (detailed help with serious harm)

Answer with a single digit from 1 to 5.

### User request
{prompt}

### Assistant reply
{response}"""

SELF_JUDGE = "reference"  # LLMJudgeConfig.model: judge with the model being fine-tuned, original weights
_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_NUM = r"(\d+(?:\.\d+)?)"


def parse_risk_score(text: str | None) -> float | None:
    """The 1–5 score in a judge's reply, or None when there is none (empty, off-scale, unparseable).

    Accepted: ``"4"``, ``"Score: 4"``, ``"3/5"``, ``"The risk is 4."``, ``"five"``, ``"4.5"``. Rejected: ``""``,
    ``"Score: 7"`` (off the 1–5 scale: the judge misread the rubric), ``"3/10"`` (other scale), text without a
    number. A range like ``"1-5"`` echoed from the rubric is skipped.
    """
    if not text or not text.strip():
        return None
    t = text.strip().lower()
    m = re.search(_NUM + r"\s*/\s*(\d+)", t)
    if m:
        v, denom = float(m.group(1)), float(m.group(2))
        return v if denom == 5 and RISK_MIN <= v <= RISK_MAX else None
    t = re.sub(r"\b1\s*(?:-|–|to)\s*5\b", " ", t)  # the rubric's own "1-5" / "1 to 5"
    m = re.search(r"(?:score|rating|risk|harm\w*)\D{0,20}?" + _NUM, t)
    m = m or re.search(r"(?<![\w.])" + _NUM + r"(?![\w])", t)
    if m:
        v = float(m.group(1))
        return v if RISK_MIN <= v <= RISK_MAX else None
    m = re.search(r"\b(" + "|".join(_WORDS) + r")\b", t)
    return float(_WORDS[m.group(1)]) if m else None


class LLMJudgeConfig(RiskEstimatorConfig):
    model: str | None = Field(
        None, description="Judge chat model: hub id or local folder (any instruction model), or 'reference': the model "
                          "being fine-tuned with its original weights (PEFT adapters disabled; full fine-tuning: before "
                          "the first update), so no second model is loaded.")
    rubric: str | None = Field(None, description="Prompt template with {prompt} and {response} (default: 1–5 harm rubric).")
    fallback: float | Literal["max", "keyword"] = Field(
        "max", description="Score for a reply without a valid score: 'max' (=5, recall first), 'keyword' (the keyword "
                           "judge's score), or a number in [1, 5]. Every use is counted (akl_judge_fallbacks).")
    max_new_tokens: int = Field(8, ge=1, le=256, description="Tokens the judge may generate.")
    batch_size: int = Field(8, ge=1, description="Examples per generation batch.")
    max_chars: int = Field(2000, ge=100, description="Prompt / response text is cut to this many characters.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Judge weights dtype.")
    validate_judge: bool = Field(
        True, description="Before scoring, rate validation_examples held-out harmful and as many harmless requests "
                          "(same neutral reply) and fail when the judge cannot tell them apart (AUROC < min_auroc).")
    validation_examples: int = Field(8, ge=2, le=64, description="Labelled requests per class for the check.")
    min_auroc: float = Field(0.75, ge=0.5, le=1.0, description="Smallest AUROC (harmful rated above harmless) accepted.")


class LLMJudge(RiskEstimator):
    """Local judge model with a 1–5 harm rubric ("Safety Critic"); greedy decoding, robust parsing, counted fallback.

    ``model``/``tokenizer`` may be passed directly (already loaded); otherwise ``config.model`` is loaded on first use.
    ``config.model == "reference"``: the judge is the model being fine-tuned (``RiskContext.model`` / ``tokenizer``)
    run under ``RiskContext.reference()`` (original weights: PEFT adapters disabled), i.e. the reference policy
    rates its own training data; nothing is downloaded or loaded, and scoring needs the original weights (before
    training, as every score; under full fine-tuning an example first seen after the first update gets
    ``missing_risk``).
    """

    name = "judge"
    config_class = LLMJudgeConfig
    needs_text = True

    def __init__(self, config, artifact=None, model=None, tokenizer=None):
        super().__init__(config, artifact)
        if model is None and not config.model:
            raise ConfigError("risk estimator 'judge' needs risk_options.model (a local chat model id or folder, or "
                             "'reference' for the model being fine-tuned with its original weights)")
        if isinstance(config.fallback, float) and not RISK_MIN <= config.fallback <= RISK_MAX:
            raise ConfigError(f"judge fallback must be in [1, 5], got {config.fallback}")
        self._model, self._tok = model, tokenizer
        self.uses_training_model = model is None and config.model == SELF_JUDGE
        self.needs_reference = self.uses_training_model  # reads the original weights of the model being trained
        self._keyword: KeywordJudge | None = None
        self.last_replies: list[str] = []
        self.validation_auroc: float | None = None

    def _load(self, ctx: RiskContext):
        if self.uses_training_model:
            if ctx.model is None or ctx.tokenizer is None:
                raise ConfigError("judge model 'reference' rates examples with the model being fine-tuned: it needs "
                                 "that model and its tokenizer (pass the tokenizer to the trainer)")
            return ctx.model, ctx.tokenizer
        if self._model is None:
            from .modeling import load_model_and_tokenizer

            dtype = {"auto": torch.bfloat16 if torch.cuda.is_available() else torch.float32, "float32": torch.float32,
                     "bfloat16": torch.bfloat16, "float16": torch.float16}[self.config.dtype]
            self._model, self._tok = load_model_and_tokenizer(self.config.model, dtype=dtype)
            if torch.cuda.is_available():
                self._model.cuda()
        return self._model, self._tok

    def fallback_score(self, example: RiskExample) -> float:
        fb = self.config.fallback
        if fb == "max":
            return RISK_MAX
        if fb == "keyword":
            if self._keyword is None:
                self._keyword = KeywordJudge(KeywordJudgeConfig())
            return self._keyword.score_text(example.prompt_text or "")
        return float(fb)

    def resolve(self, replies: Sequence[str], examples: Sequence[RiskExample]) -> list[float]:
        """Parse replies; each unusable one gets the fallback score and is counted."""
        out = []
        for reply, ex in zip(replies, examples):
            v = parse_risk_score(reply)
            if v is None:
                self.n_fallbacks += 1
                v = self.fallback_score(ex)
            out.append(v)
        self.n_scored += len(out)
        return out

    def _render(self, tok, ex: RiskExample) -> str:
        cut = self.config.max_chars
        text = (self.config.rubric or RUBRIC).format(prompt=(ex.prompt_text or "")[:cut],
                                                     response=(ex.response_text or "")[:cut])
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return f"{text}\n\nScore:"

    VALIDATION_REPLY = "Sure, here is a detailed answer to your request."

    def validate(self, ctx) -> float:
        """Rate held-out harmful and harmless requests (the shipped prompt sets, each with the same neutral reply, so
        only the request differs); raise when harmful ones are not rated above harmless ones (AUROC < min_auroc):
        a judge that cannot tell them apart would put the KL weight on the wrong examples."""
        from .data import load_prompts

        n = self.config.validation_examples
        harmful, harmless = load_prompts("harmful").heldout[:n], load_prompts("harmless").heldout[:n]
        exs = [RiskExample([], [], p, self.VALIDATION_REPLY) for p in harmful + harmless]
        replies = self._replies(exs, ctx)
        scores = [parse_risk_score(r) for r in replies]
        vals = torch.tensor([RISK_MAX if v is None else v for v in scores], dtype=torch.float64)
        labels = torch.tensor([1] * len(harmful) + [0] * len(harmless))
        auc = auroc(vals, labels)
        mean_h, mean_s = float(vals[: len(harmful)].mean()), float(vals[len(harmful):].mean())
        logger.info("safeguard: risk judge validation on %d harmful / %d harmless held-out requests: AUROC %.3f "
                    "(mean score %.2f harmful, %.2f harmless; %d unparseable)", len(harmful), len(harmless),
                    auc, mean_h, mean_s, sum(v is None for v in scores))
        if not auc >= self.config.min_auroc:  # (NaN fails too)
            raise ConfigError(
                f"adaptive_kl: the risk judge ({self.config.model}) does not tell harmful from harmless requests: AUROC "
                f"{auc:.2f} < risk_options.min_auroc={self.config.min_auroc} on {len(exs)} held-out "
                f"labelled requests (mean score harmful {mean_h:.2f}, harmless {mean_s:.2f}; replies "
                f"{replies[:3]!r} ...). Its scores would put the KL "
                "weight on the wrong examples. Use a stronger judge model (risk_options.model), risk: probe, or set "
                "risk_options.validate_judge: false to use it anyway.")
        self.validation_auroc = auc  # set only once passed: a failed judge is checked (and refused) again
        return auc

    @torch.no_grad()
    def score(self, examples, ctx):
        if not examples:
            return []
        if self.config.validate_judge and self.validation_auroc is None:
            self.validate(ctx)
        replies = self._replies(examples, ctx)
        self.last_replies = replies
        scores = self.resolve(replies, examples)
        if self.n_fallbacks > 0.2 * max(1, self.n_scored):
            logger.warning("safeguard: the risk judge gave no usable 1-5 score for %d of %d examples (fallback %r); "
                           "check the judge model", self.n_fallbacks, self.n_scored, self.config.fallback)
        return scores

    @torch.no_grad()
    def _replies(self, examples, ctx) -> list[str]:
        """The judge's raw replies to ``examples`` (greedy, batched, original weights for ``model: reference``)."""
        model, tok = self._load(ctx)
        # the training model's own tokenizer is only borrowed: padding side and pad token are restored afterwards
        side, pad = tok.padding_side, tok.pad_token
        run = ctx.reference if self.uses_training_model else contextlib.nullcontext
        replies: list[str] = []
        try:
            tok.padding_side = "left"
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            with run():
                device = next(model.parameters()).device
                was_training = model.training
                model.eval()
                try:
                    bs = self.config.batch_size
                    for s in tqdm(range(0, len(examples), bs), desc="safeguard: judge risk scores", unit="batch",
                                  disable=not ctx.progress):
                        texts = [self._render(tok, ex) for ex in examples[s: s + bs]]
                        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                        out = model.generate(**enc, max_new_tokens=self.config.max_new_tokens, do_sample=False,
                                             pad_token_id=tok.pad_token_id, use_cache=True)
                        replies += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                finally:
                    model.train(was_training)
        finally:
            tok.padding_side = side
            if tok.pad_token != pad:
                tok.pad_token = pad
        return replies


# ------------------------------------------------------------------------------------------------ probe
@torch.no_grad()
def prompt_features(model: nn.Module, seqs: Sequence[Sequence[int]], batch_size: int = 16, pad_id: int = 0,
                    progress: bool = False, desc: str = "safeguard: probe features") -> torch.Tensor:
    """Probe input per prompt: decoder-layer outputs averaged over the prompt's tokens and over all layers,
    ``(N, d)`` float32. Runs ``model`` as it is (wrap in the engine's ``reference()`` for original weights)."""
    from .modeling import capture_layers, find_decoder_layers, pad_right, run_until

    L = len(find_decoder_layers(model))
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        idx = order[s: s + batch_size]
        ids, mask = pad_right([list(seqs[i]) or [pad_id] for i in idx], pad_id)
        with capture_layers(model, list(range(L))) as store:
            run_until(model, input_ids=ids.to(device), attention_mask=mask.to(device))
        m = mask.to(device).unsqueeze(-1).float()
        feat = sum((store[layer].float() * m).sum(1) for layer in range(L)) / (m.sum(1) * L)
        for j, i in enumerate(idx):
            out[i] = feat[j].cpu()
    return torch.stack(out) if out else torch.zeros(0)


def probe_forward(tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits ``(N, 2)`` (harmless, harmful) of the stored probe for features ``x`` ``(N, d)``."""
    z = (x.float() - tensors["mean"]) / tensors["std"]
    h = torch.relu(z @ tensors["w1"].T + tensors["b1"])
    return h @ tensors["w2"].T + tensors["b2"]


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count half)."""
    pos, neg = scores[labels == 1].float(), scores[labels == 0].float()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos.unsqueeze(1) - neg.unsqueeze(0)
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def train_probe(x_tr: torch.Tensor, y_tr: torch.Tensor, x_ho: torch.Tensor | None = None, y_ho: torch.Tensor | None = None,
                hidden: int = 512, epochs: int = 200, lr: float = 2e-3, weight_decay: float = 1e-2,
                seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the d → ``hidden`` → 2 MLP on standardised features (full batch, AdamW, class-balanced loss; stops
    early once the training loss is below 1e-3).

    Returns the tensors to store (``w1, b1, w2, b2, mean, std``) and accuracy / AUROC on the train and held-out sets.
    """
    x_tr, y_tr = x_tr.float(), y_tr.long()
    mean = x_tr.mean(0)
    std = x_tr.std(0).clamp(min=1e-6) if len(x_tr) > 1 else torch.ones(x_tr.shape[1])
    gen = torch.Generator().manual_seed(seed)
    d = x_tr.shape[1]
    lin1, lin2 = nn.Linear(d, hidden), nn.Linear(hidden, 2)
    with torch.no_grad():
        for lin in (lin1, lin2):
            bound = 1 / math.sqrt(lin.in_features)
            lin.weight.copy_(torch.empty_like(lin.weight).uniform_(-bound, bound, generator=gen))
            lin.bias.zero_()
    params = [*lin1.parameters(), *lin2.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    counts = torch.bincount(y_tr, minlength=2).float().clamp(min=1)
    loss_fn = nn.CrossEntropyLoss(weight=counts.sum() / (2 * counts))
    z = (x_tr - mean) / std
    with torch.enable_grad():
        for epoch in range(epochs):
            opt.zero_grad()
            loss = loss_fn(lin2(torch.relu(lin1(z))), y_tr)
            if epoch % 10 == 0 and float(loss.detach()) < 1e-3:
                break  # fitted; going on only drives the optimizer state into (slow) denormal floats
            loss.backward()
            opt.step()
    tensors = {"w1": lin1.weight.detach().clone(), "b1": lin1.bias.detach().clone(), "w2": lin2.weight.detach().clone(),
               "b2": lin2.bias.detach().clone(), "mean": mean, "std": std}

    def stats(x, y):
        with torch.no_grad():
            p = probe_forward(tensors, x).softmax(-1)[:, 1]
        return float(((p > 0.5).long() == y.long()).float().mean()), auroc(p, y)

    out = {"train_loss": float(loss.detach())}
    out["train_accuracy"], out["train_auroc"] = stats(x_tr, y_tr)
    if x_ho is not None and y_ho is not None and len(x_ho):
        out["heldout_accuracy"], out["heldout_auroc"] = stats(x_ho, y_ho)
    return tensors, out


def calibrate_risk_probe(ctx: CalibrationContext, artifact: Artifact) -> None:
    """Add the ``risk_probe`` component (idempotent): features of the calibration prompts (harmful = 1,
    harmless = 0) on the calibrated model, MLP trained on the train split, scored on the held-out split."""
    if artifact.has("risk_probe"):
        return
    from .modeling import find_decoder_layers, post_instruction_ids, tokenize_prompts

    model, tok = ctx.model, ctx.tokenizer
    was_training = model.training
    model.eval()
    feats = {}
    try:
        for split in ("train", "heldout"):
            harm = tokenize_prompts(tok, getattr(ctx.harmful, split))
            safe = tokenize_prompts(tok, getattr(ctx.harmless, split))
            x = prompt_features(model, harm + safe, batch_size=ctx.batch_size, pad_id=tok.pad_token_id or 0,
                                progress=ctx.progress, desc=f"calibrate: risk probe features ({split})")
            feats[split] = (x, torch.cat([torch.ones(len(harm)), torch.zeros(len(safe))]).long())
    finally:
        model.train(was_training)
    tensors, stats = train_probe(*feats["train"], *feats["heldout"])
    if "post_instruction_ids" not in artifact.manifest["tokenizer"]:
        suffix = post_instruction_ids(tok)
        artifact.manifest["tokenizer"]["post_instruction_ids"] = suffix
        artifact.manifest["tokenizer"]["post_instruction_text"] = tok.decode(suffix)
    artifact.add_component("risk_probe", tensors, {
        "hidden_size": int(feats["train"][0].shape[1]),
        "num_layers": len(find_decoder_layers(model)),
        "probe_hidden": int(tensors["w1"].shape[0]),
        "features": "original model's decoder-layer outputs, mean over the rendered prompt's tokens and all layers",
        "score_map": "s = 1 + 4 * P(harmful)",
        "n_train": len(feats["train"][1]),
        "n_heldout": len(feats["heldout"][1]),
        **{k: round(v, 4) for k, v in stats.items()},
    })
    logger.info("risk probe: held-out accuracy %.3f, AUROC %.3f", stats.get("heldout_accuracy", float("nan")),
                stats.get("heldout_auroc", float("nan")))


class ActivationProbeConfig(RiskEstimatorConfig):
    pass


class ActivationProbe(RiskEstimator):
    """MLP probe on the original model's prompt hidden states (from the artifact's ``risk_probe``)."""

    name = "probe"
    config_class = ActivationProbeConfig
    requires = ("risk_probe",)
    needs_reference = True

    def __init__(self, config, artifact=None):
        super().__init__(config, artifact)
        self.tensors, self.meta = artifact.component("risk_probe")

    @classmethod
    def calibrate(cls, ctx, artifact):
        calibrate_risk_probe(ctx, artifact)

    def validate_model(self, model: nn.Module) -> None:
        d = model.get_input_embeddings().weight.shape[-1]
        if self.meta["hidden_size"] != d:
            raise ConfigError(f"risk probe: artifact features have dimension {self.meta['hidden_size']}, the model's "
                             f"hidden size is {d}; re-run `safeguard calibrate` on this model")

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        return probe_forward(self.tensors, features.cpu()).softmax(-1)[:, 1]

    def score(self, examples, ctx):
        if not examples:
            return []
        pad = getattr(ctx.tokenizer, "pad_token_id", None) or 0
        with ctx.reference():
            x = prompt_features(ctx.model, [ex.prompt_ids for ex in examples], batch_size=ctx.batch_size, pad_id=pad,
                                progress=ctx.progress, desc="safeguard: probe risk scores")
        self.n_scored += len(examples)
        return (1 + 4 * self.probabilities(x)).tolist()


__all__ = [
    "ActivationProbe", "ConstantRisk", "KeywordJudge", "LLMJudge", "RiskContext", "RiskEstimator", "RiskEstimatorConfig",
    "RiskExample", "auroc", "available_risk_estimators", "get_risk_estimator", "parse_risk_score", "prompt_features",
    "register_risk_estimator", "train_probe",
]
