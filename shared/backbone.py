"""Offline SmolVLM backbone folders (config, tokenizer, processor; never weights).

SmolVLA builds its vision-language model from ``vlm_model_name`` with AutoConfig and
AutoProcessor; with ``load_vlm_weights=False`` it reads nothing else. A local folder written
here therefore stands in for ``HuggingFaceTB/SmolVLM2-500M-Video-Instruct`` where the Hub is out
of reach: ``tiny`` for tests and demos, ``full`` with SmolVLM2-500M's published dimensions to
measure real-size cost. Generation is deterministic, so the folder's recipe hash names it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

#: Bump when the generated files change for the same recipe.
GENERATOR_VERSION = 1

SPECIAL_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
OTHER_SPECIAL_TOKENS = ("<|im_start|>", "<|endoftext|>", "<pad>")
#: Text the byte-level BPE is trained on: robot task phrasing, so common words get their own token.
TOKENIZER_CORPUS = (
    "pick up the cube and place it in the bin",
    "pick the red cube, place it in the box",
    "move the block to the goal region",
    "grasp the object and put it on the target",
    "stack the cube on top of the other cube",
    "push the cube to the left side of the table",
    "open the gripper, close the gripper, lift the arm",
)


@dataclass(frozen=True)
class BackboneRecipe:
    """Dimensions of a SmolVLM backbone (text decoder plus SigLIP-style vision encoder)."""

    name: str
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_ffn: int
    vocab_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int
    image_size: int
    patch_size: int
    scale_factor: int
    tokenizer_vocab: int = 512

    @property
    def image_seq_len(self) -> int:
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2

    def digest(self) -> str:
        payload = json.dumps({"generator": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


TINY = BackboneRecipe(
    name="tiny",
    text_hidden=64,
    text_layers=4,
    text_heads=4,
    text_kv_heads=2,
    text_ffn=128,
    vocab_size=512,
    vision_hidden=32,
    vision_layers=2,
    vision_heads=2,
    vision_ffn=64,
    image_size=64,
    patch_size=16,
    scale_factor=2,
)
#: SmolVLM2-500M-Video-Instruct's published dimensions (the backbone of lerobot/smolvla_base).
SMOLVLM2_500M = BackboneRecipe(
    name="smolvlm2-500m-arch",
    text_hidden=960,
    text_layers=32,
    text_heads=15,
    text_kv_heads=5,
    text_ffn=2560,
    vocab_size=49280,
    vision_hidden=768,
    vision_layers=12,
    vision_heads=12,
    vision_ffn=3072,
    image_size=512,
    patch_size=16,
    scale_factor=4,
)


def _train_tokenizer(recipe: BackboneRecipe) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIAL_TOKENS.values(), *OTHER_SPECIAL_TOKENS]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.tokenizer_vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
        extra_special_tokens=SPECIAL_TOKENS,
        model_max_length=2048,
    )


def write_backbone(recipe: BackboneRecipe, folder: Path) -> Path:
    """Write config, tokenizer and processor of ``recipe`` into ``folder`` (no weights)."""
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMProcessor, SmolVLMVisionConfig
    from transformers.models.smolvlm import SmolVLMImageProcessor, SmolVLMVideoProcessor

    tokenizer = _train_tokenizer(recipe)
    image_token_id = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image_token"])  # type: ignore[attr-defined]
    text = LlamaConfig(
        vocab_size=max(recipe.vocab_size, len(tokenizer)),  # type: ignore[arg-type]
        hidden_size=recipe.text_hidden,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.text_heads,
        num_key_value_heads=recipe.text_kv_heads,
        intermediate_size=recipe.text_ffn,
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
    )
    vision = SmolVLMVisionConfig(
        hidden_size=recipe.vision_hidden,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.vision_heads,
        intermediate_size=recipe.vision_ffn,
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
    )
    config = SmolVLMConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        scale_factor=recipe.scale_factor,
        image_token_id=image_token_id,
    )
    size = {"longest_edge": recipe.image_size}
    image_processor = SmolVLMImageProcessor(
        size=size, do_image_splitting=False, max_image_size=size
    )
    video_processor = SmolVLMVideoProcessor(size=size, max_image_size=size)
    processor = SmolVLMProcessor(
        image_processor, tokenizer, video_processor, image_seq_len=recipe.image_seq_len
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
