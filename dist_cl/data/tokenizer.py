"""Captions to token ids with open_clip's tokenizer, offline: only the BPE vocabulary its wheel ships.

open_clip picks a model's tokenizer from its config: its own BPE (``SimpleTokenizer``) for most models, or a
Hugging Face tokenizer (``hf_tokenizer_name``, and every SigLIP model) that it downloads on first use. A run
must not download at start-up, so only the first kind is accepted, and any other name is refused with the
names that work. open_clip is imported on first use: it imports timm and huggingface_hub, seconds that a
process which never tokenises should not pay.
"""

DEFAULT_TOKENIZER = "ViT-B-32"


class TokenizerError(ValueError):
    """A tokenizer name open_clip does not know, or one whose tokenizer would be downloaded."""


def _hub_tokenizer(name: str) -> str | None:
    """Where open_clip would download ``name``'s tokenizer from, or None where it ships in the wheel."""
    import open_clip

    text_cfg = open_clip.get_model_config(name)["text_cfg"]
    if text_cfg.get("hf_tokenizer_name"):
        return f"the Hugging Face hub ({text_cfg['hf_tokenizer_name']})"
    if "siglip" in name.lower():
        return "the Hugging Face hub (SigLIP's sentencepiece tokenizer)"
    return None


class CaptionTokenizer:
    """open_clip's tokenizer for model ``name`` (its context length unless given): caption -> LongTensor.

    Picklable at the size of its two arguments: the BPE tables are built in each process on first use,
    not sent to every DataLoader worker.
    """

    def __init__(self, name: str = DEFAULT_TOKENIZER, context_length: int | None = None):
        import open_clip

        if ":" in name or open_clip.get_model_config(name) is None:
            raise TokenizerError(
                f"tokenizer {name!r} is not one of open_clip's built-in model names (open_clip.list_models()); "
                f"use one whose vocabulary ships with open_clip, e.g. {DEFAULT_TOKENIZER}, ViT-B-16 or RN50"
            )
        hub = _hub_tokenizer(name)
        if hub is not None:
            raise TokenizerError(
                f"tokenizer {name!r} would be downloaded from {hub}, and runs do not download; use a model "
                f"name with open_clip's own BPE tokenizer, e.g. {DEFAULT_TOKENIZER}"
            )
        if context_length is not None and context_length < 2:
            raise TokenizerError(f"context_length={context_length} leaves no room for the start and end tokens")
        self.name = name
        self.context_length = context_length or open_clip.get_model_config(name)["text_cfg"]["context_length"]
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, caption: str):
        """(context_length,) int64 token ids: start, BPE of the cleaned caption, end, zero padding; a
        caption longer than the context is cut and ends with the end token, as open_clip does."""
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.name, context_length=self.context_length)
        return self._tokenizer([caption])[0]
