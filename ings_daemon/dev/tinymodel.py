"""A tiny randomly initialised Llama-architecture model with its own tokenizer.

No model weights can be downloaded here, so tests, benchmarks and the embedded default
train this model (the same convention as the tiny-random test models that transformers
and peft use). It is built from a config and a BPE tokenizer trained on a small corpus
kept in this module, so it needs no network and is identical for a given seed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, as Qwen and many other chat models write it; the answer ends with <|im_end|>.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Enough varied English for a byte-level BPE of roughly a thousand tokens, including the
# words of the prompt template the trainer uses.
_CORPUS = """\
### Input:
### Response:
The quick brown fox jumps over the lazy dog. A persona remembers what it said and keeps
learning from every conversation it has. Memory holds each exchange as a searchable record.
What colour is the sky? The sky is blue on a clear day and grey when it rains.
What colour is the grass? The grass is green in spring and brown in a dry summer.
How do I review a pull request? Read the description first, then the tests, then the code.
Keep changes small, name things for what they mean, and write down why, not what.
Why did the build fail? The build failed because a test timed out while waiting for the broker.
A technical lead answers questions about design, code review, testing and deployment.
Please explain the difference between a process and a thread in plain words.
A process has its own memory; threads share the memory of the process that started them.
The weather today is cold and windy, with a little sun in the afternoon.
She opened the window, looked at the garden and smiled at the birds on the fence.
Numbers: one two three four five six seven eight nine ten eleven twelve hundred thousand.
Days: Monday Tuesday Wednesday Thursday Friday Saturday Sunday. Months: January February
March April May June July August September October November December.
Good morning! Thank you for asking. I think the answer is yes, but let me check again.
Training a small adapter takes minutes; loading the base model can take longer than that.
If the loss does not go down, lower the learning rate or add more varied examples.
Every version of an adapter is written once, checked, renamed into place and announced.
The river runs past the old mill, under the stone bridge and out to the sea.
Could you summarise the meeting? We agreed to ship on Friday and to fix the flaky test first.
Where is the station? Walk straight ahead, turn left at the bakery, and it is on your right.
"""


def _train_tokenizer(vocab_size: int) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    # Repeating the corpus only changes pair counts uniformly; it keeps rare words'
    # merges above the trainer's minimum frequency.
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    return tokenizer


def _has_model(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file()


def make_tiny_model(
    directory: Path,
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 128,
    vocab_size: int = 1024,
    architecture: Literal["llama", "gpt2", "mixtral"] = "llama",
    max_positions: int = 4096,
    initializer_range: float = 0.02,
    chat_template: bool = False,
) -> Path:
    """Write a tiny causal LM and its tokenizer to `directory` and return it: Llama; GPT-2
    with `max_positions` learned positions; or Mixtral, a mixture of four experts. With
    `chat_template` the tokenizer carries ChatML and its two special tokens, and generation
    also stops at <|im_end|>.

    Idempotent: a folder that already holds a model is returned untouched. The files are
    written to a sibling temporary folder and renamed into place, so a concurrent caller
    never sees half a model.
    """
    directory = Path(directory)
    if _has_model(directory):
        return directory

    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        PretrainedConfig,
        PreTrainedTokenizerFast,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
    )
    if chat_template:
        fast.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
        fast.chat_template = CHATML
    if architecture == "gpt2":
        # GPT-2's learned positions: a sequence past n_positions is an index error, not a
        # slow run, which is what context-limit checks must prevent.
        config: PretrainedConfig = GPT2Config(
            vocab_size=len(fast),
            n_embd=hidden_size,
            n_layer=num_hidden_layers,
            n_head=num_attention_heads,
            n_inner=intermediate_size,
            n_positions=max_positions,
            initializer_range=initializer_range,
            bos_token_id=fast.bos_token_id,
            eos_token_id=fast.eos_token_id,
            pad_token_id=fast.pad_token_id,
        )
        model_class: Any = GPT2LMHeadModel
    else:
        # Llama, and Mixtral with the same shape and four experts (in transformers 5 its
        # experts are 3-D tensors, not nn.Linear).
        shape: dict[str, Any] = {
            "vocab_size": len(fast),
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_attention_heads,
            "max_position_embeddings": max_positions,
            "initializer_range": initializer_range,
            "bos_token_id": fast.bos_token_id,
            "eos_token_id": fast.eos_token_id,
            "pad_token_id": fast.pad_token_id,
            "tie_word_embeddings": False,
        }
        if architecture == "mixtral":
            config = MixtralConfig(**shape, num_local_experts=4, num_experts_per_tok=2)
            model_class = MixtralForCausalLM
        else:
            config = LlamaConfig(**shape)
            model_class = LlamaForCausalLM
    # A private generator state: seeding the global one would change the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config.pad_token_id = fast.pad_token_id
    model.generation_config.eos_token_id = (
        [fast.eos_token_id, fast.convert_tokens_to_ids(IM_END)] if chat_template else fast.eos_token_id
    )
    model.generation_config.bos_token_id = fast.bos_token_id

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    # mkdtemp makes the folder private; a model folder is meant to be read by others.
    staging.chmod(0o755)
    try:
        model.save_pretrained(staging)
        fast.save_pretrained(staging)
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        try:
            staging.rename(directory)
        except OSError:
            # Another caller finished first; theirs is as good as ours.
            if not _has_model(directory):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
