"""Model configuration and the TinyStories presets. Plain dataclasses: no torch here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import UserError

# The TinyStories model family (Eldan & Li, 2023, arXiv 2305.07759): width, depth and heads. Names follow
# the paper; the true parameter count depends on the vocabulary and is printed by `gpt-tinystories presets`.
PRESETS: dict[str, dict[str, int]] = {
    "1M": {"d_model": 64, "n_layer": 8, "n_head": 16},
    "3M": {"d_model": 128, "n_layer": 8, "n_head": 16},
    "8M": {"d_model": 256, "n_layer": 8, "n_head": 16},
    "28M": {"d_model": 512, "n_layer": 8, "n_head": 16},
    "33M": {"d_model": 768, "n_layer": 4, "n_head": 16},
    # What the original gpt-tinystories "28M" config really trained: hidden size 1024, 152M parameters
    # with the GPT-2 vocabulary. Kept so its results can be reproduced and compared.
    "28M-seed": {"d_model": 1024, "n_layer": 8, "n_head": 16},
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int = 256
    n_layer: int = 8
    n_head: int = 16
    context_length: int = 512
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "context_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0]
            shown = ", ".join(map(str, divisors[:12])) + (", ..." if len(divisors) > 12 else "")
            raise UserError(
                f"model config: d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                f"choose n_head from the divisors of d_model ({shown})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model config: dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_preset(cls, preset: str, vocab_size: int, **overrides: object) -> ModelConfig:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[preset], "vocab_size": vocab_size, **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(
                f"model config: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    # Parameter counts from the shapes alone, so presets can be listed without building a model.
    # A test checks them against the real module.
    def num_parameters(self, non_embedding: bool = False) -> int:
        d, bias = self.d_model, int(self.bias)
        layer_norm = d + bias * d
        per_layer = (
            2 * layer_norm
            + 3 * d * d
            + bias * 3 * d  # attention q, k, v
            + d * d
            + bias * d  # attention output
            + 4 * d * d
            + bias * 4 * d  # MLP up
            + 4 * d * d
            + bias * d  # MLP down
        )
        body = self.n_layer * per_layer + layer_norm
        embeddings = self.vocab_size * d + self.context_length * d  # LM head is tied to the token embedding
        return body if non_embedding else body + embeddings
