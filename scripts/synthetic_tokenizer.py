"""A model folder for serving dummy weights: a config folder's `config.json` and a synthetic
tokenizer of the config's vocabulary size, so that `pagejax serve FOLDER --load-format dummy`
runs (the server detokenizes) and `pagejax bench serve --tokenizer FOLDER` sends prompts of
exactly `--random-input-len` tokens.

    python scripts/synthetic_tokenizer.py scripts/configs/llama-3.1-8b /tmp/llama8b

The tokenizer is a `WordLevel` model over the words `w1 ... w{V-1}` split on whitespace, so a
random prompt of N ids decodes to N words and encodes back to the same N ids. Llama 3's
special tokens keep their ids where the vocabulary has room for them (`<|begin_of_text|>`
128000 as BOS, `<|end_of_text|>` 128001, `<|eot_id|>` 128009 as EOS); id 0 is the unknown
word. docs/BENCHMARKS.md's serving runs use this folder (named `.dev/llama8b` there).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SPECIAL = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128009: "<|eot_id|>"}


def write(config_dir: Path, out: Path) -> Path:
    """Copy `config_dir/config.json` to `out` and write the tokenizer beside it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_dir / "config.json", out / "config.json")
    vocab_size = json.loads((config_dir / "config.json").read_text())["vocab_size"]
    special = {i: text for i, text in SPECIAL.items() if i < vocab_size}
    vocab = {special.get(i, f"w{i}"): i for i in range(1, vocab_size)} | {"[UNK]": 0}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by spaces
    tokenizer.add_special_tokens(list(special.values()))
    tokenizer.save(str(out / "tokenizer.json"))
    bos, eos = special.get(128000), special.get(128009)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1 << 20,
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}",
    }
    config |= {"bos_token": bos} if bos else {}
    config |= {"eos_token": eos} if eos else {}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config_dir", type=Path, help="a folder with config.json")
    p.add_argument("out", type=Path, help="the model folder to write")
    args = p.parse_args()
    print(write(args.config_dir, args.out))


if __name__ == "__main__":
    main()
