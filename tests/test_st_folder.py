"""sentence-transformers folders in and out: the pooling read from a folder's modules (the real
MiniLM-L6 folder, tiny BERT folders in every pooling mode), the errors for what is not supported, a
non-uniform slim model written as a folder that ``SentenceTransformer`` loads, and a text run whose
``slim/`` is one. Every comparison is against ``SentenceTransformer(folder).encode`` of the same texts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import sentence_transformers as st  # the optional extra hawada[st]; pinned in requirements-dev.txt
import torch
from transformers import BertConfig, BertModel

import hawada
from hawada.adapters import st_folder
from hawada.adapters.hf_encoder import HFEncoderAdapter, stock_loadable
from hawada.adapters.st_folder import Pooling
from hawada.cli import main
from hawada.config import load_recipe
from hawada.core.gates import GateConfig
from hawada.data.text import load_tokenizer, tokenize
from hawada.errors import InputError
from hawada.jobs.text import embed, packaged_minilm_folder
from tests.test_text_job import smoke_overrides

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "cpu", "minilm-l6.yaml")
TEXTS = [
    "Return the number of items in a container.",
    "The quick brown fox jumps over the lazy dog.",
    "Open the file and return a stream; raise OSError upon failure.",
    "A",
    "Split the string at the first occurrence of sep, and return a 3-tuple containing the part "
    "before the separator, the separator itself, and the part after the separator.",
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
TOL = 1e-5


def hawada_embeddings(model: torch.nn.Module, folder: str, seq_len: int, texts=TEXTS) -> torch.Tensor:
    """``[N, D]`` embeddings as a text run computes them (the job's tokenisation and ``embed``),
    truncated at ``seq_len`` tokens (the folder's ``max_seq_length``: the last text is longer)."""
    data = tokenize(load_tokenizer(folder), list(texts), seq_len=seq_len)
    return embed(model, HFEncoderAdapter(), data, torch.device("cpu"), batch_size=2)


def st_embeddings(folder: str, texts=TEXTS, **kw) -> torch.Tensor:
    model = st.SentenceTransformer(folder, device="cpu", **kw)
    return model.encode(list(texts), convert_to_tensor=True, batch_size=2).float().cpu()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def tiny_bert(hidden: int = 48, heads: int = 6, ffn: int = 100, layers: int = 3, seed: int = 0) -> BertModel:
    """A random BERT whose vocabulary is MiniLM's (so MiniLM's tokenizer files serve it)."""
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(cfg).eval()


def copy_tokenizer(folder) -> None:
    src = packaged_minilm_folder()
    for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), os.path.join(folder, f))


def write_tiny_st_folder(folder, pooling_cfg: dict, normalize: bool, model: BertModel | None = None) -> str:
    """A sentence-transformers folder written by hand in the legacy layout (module types under
    ``sentence_transformers.models``), as older folders on the Hub are."""
    folder = str(folder)
    (model or tiny_bert()).save_pretrained(folder)
    copy_tokenizer(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    os.makedirs(os.path.join(folder, "1_Pooling"))
    with open(os.path.join(folder, "modules.json"), "w") as f:
        json.dump(modules, f)
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 48, **pooling_cfg}, f)
    with open(os.path.join(folder, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": 40, "do_lower_case": False}, f)
    return folder


def test_real_minilm_folder_gives_mean_pooling_normalised_and_sentence_transformers_embeddings() -> None:
    torch.set_num_threads(1)
    folder = packaged_minilm_folder()
    spec = st_folder.read_st_folder(folder)
    assert spec.pooling == Pooling(("mean",), normalize=True)
    assert spec.transformer_path == "" and spec.max_seq_length == 256
    model = HFEncoderAdapter().load_model("minilm", 0, folder)
    assert st_folder.pooling_of(model) == Pooling(("mean",), True)
    assert model.config.hawada_pooling == {"modes": ["mean"], "normalize": True}
    ours = hawada_embeddings(model, folder, 256)
    theirs = st_embeddings(folder)
    assert ours.shape == (len(TEXTS), 384)
    assert max_abs(ours, theirs) < TOL
    # the comparison can fail: the same model's first-token embedding is far from it
    st_folder.set_pooling(model, Pooling(("cls",), True))
    assert max_abs(hawada_embeddings(model, folder, 256), theirs) > 0.05


@pytest.mark.parametrize(
    "pooling_cfg, modes",
    [
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, ("cls",)),  # legacy keys
        ({"pooling_mode": "max"}, ("max",)),
        ({"pooling_mode": "mean"}, ("mean",)),
        ({"pooling_mode": "mean_sqrt_len_tokens"}, ("mean_sqrt_len_tokens",)),
        ({"pooling_mode": "weightedmean"}, ("weightedmean",)),
        ({"pooling_mode": "lasttoken"}, ("lasttoken",)),
        ({"pooling_mode": ["cls", "mean"]}, ("cls", "mean")),  # concatenated
    ],
)
def test_tiny_folder_without_normalize_is_read_and_matches(tmp_path, pooling_cfg: dict, modes: tuple) -> None:
    folder = write_tiny_st_folder(tmp_path / "st", pooling_cfg, normalize=False)
    spec = st_folder.read_st_folder(folder)
    assert spec.pooling == Pooling(modes, normalize=False) and spec.max_seq_length == 40
    model = HFEncoderAdapter().load_model("bert", 0, folder)
    ours = hawada_embeddings(model, folder, 40)
    assert ours.shape == (len(TEXTS), 48 * len(modes))
    assert not torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-3)  # not normalised
    assert max_abs(ours, st_embeddings(folder)) < TOL


def test_tiny_folder_with_normalize_and_cls(tmp_path) -> None:
    folder = write_tiny_st_folder(tmp_path / "st", {"pooling_mode": "cls"}, normalize=True)
    model = HFEncoderAdapter().load_model("bert", 0, folder)
    assert st_folder.pooling_of(model) == Pooling(("cls",), True)
    ours = hawada_embeddings(model, folder, 40)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    assert max_abs(ours, st_embeddings(folder)) < TOL


def test_plain_folder_keeps_the_normalised_mean(tmp_path) -> None:
    model = tiny_bert()
    model.save_pretrained(tmp_path)
    loaded = HFEncoderAdapter().load_model("bert", 0, str(tmp_path))
    assert not hasattr(loaded.config, st_folder.CONFIG_KEY)
    assert st_folder.pooling_of(loaded) == Pooling(("mean",), True)
    h = torch.randn(2, 5, 48)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expect = torch.nn.functional.normalize(h[0, :3].mean(0), dim=0)
    assert torch.allclose(st_folder.pool(h, m, st_folder.pooling_of(loaded))[0], expect, atol=1e-6)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: _pool_cfg(d, {"pooling_mode": "attention"}), "unsupported pooling mode 'attention'"),
        (lambda d: _pool_cfg(d, {"pooling_mode": []}), "non-empty list"),
        (lambda d: _add_module(d, "sentence_transformers.models.Dense"), "Dense is not supported"),
        (lambda d: _add_module(d, "my_package.Custom"), "Custom is not supported"),
        (lambda d: os.remove(os.path.join(d, "1_Pooling", "config.json")), "Pooling module's config"),
        (lambda d: _write(os.path.join(d, "modules.json"), "[{"), "not valid JSON"),
    ],
)
def test_unsupported_folders_are_one_line_input_errors(tmp_path, edit, message: str) -> None:
    folder = write_tiny_st_folder(tmp_path / "st", {"pooling_mode": "mean"}, normalize=True)
    edit(folder)
    with pytest.raises(InputError, match=message) as e:
        HFEncoderAdapter().load_model("bert", 0, folder)
    assert "\n" not in str(e.value)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _pool_cfg(folder: str, cfg: dict) -> None:
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
        json.dump(cfg, f)


def _add_module(folder: str, type_name: str) -> None:
    path = os.path.join(folder, "modules.json")
    with open(path) as f:
        mods = json.load(f)
    mods.append({"idx": 3, "name": "3", "path": "3_X", "type": type_name})
    with open(path, "w") as f:
        json.dump(mods, f)


def _close_some(store) -> None:
    """Layer 0 loses every head, layer 1 two FFN groups and two heads, layer 2 stays whole: a
    non-uniform layout that only the remote-code class describes."""
    with torch.no_grad():
        store.logits.fill_(3.0)
        s = store.segment("layer0.heads")
        store.logits[s.start : s.stop] = -3.0
        s = store.segment("layer1.ffn")
        store.logits[s.start : s.start + 2] = -3.0
        s = store.segment("layer1.heads")
        store.logits[s.start + 1 : s.start + 3] = -3.0


@pytest.mark.parametrize("pooling", [Pooling(("mean",), True), Pooling(("max",), False)])
def test_non_uniform_slim_round_trip_through_sentence_transformers(tmp_path, pooling: Pooling) -> None:
    torch.set_num_threads(1)
    teacher = tiny_bert()
    st_folder.set_pooling(teacher, pooling)  # travels: attach copies it, export clones it
    g = hawada.attach(teacher, GateConfig(group_size={"ffn": 16}))
    _close_some(hawada.gates(g))
    g.eval()
    slim = hawada.export(g)
    lay = HFEncoderAdapter().layout(slim)
    assert [x["attn"] for x in lay["layers"]] == [0, 32, 48] and [x["ffn"] for x in lay["layers"]] == [
        100,
        68,
        100,
    ]
    assert not stock_loadable(slim)
    assert st_folder.pooling_of(slim) == pooling

    folder = str(tmp_path / "slim")
    HFEncoderAdapter().save(slim, folder)
    copy_tokenizer(folder)
    st_folder.write_st_folder(folder, st_folder.pooling_of(slim), slim.config.hidden_size, 64)
    assert os.path.isdir(os.path.join(folder, "2_Normalize")) == pooling.normalize

    ours = hawada_embeddings(slim, folder, 64)
    with torch.no_grad():  # the slim model pools as the gated model does
        gated = hawada_embeddings(g, folder, 64)
    assert max_abs(ours, gated) < TOL
    theirs = st_embeddings(folder, trust_remote_code=True)
    assert max_abs(ours, theirs) < TOL
    # hawada's own loader reads the pooling back from config.json and the folder's modules
    again = HFEncoderAdapter().load_model("bert", 0, folder)
    assert st_folder.pooling_of(again) == pooling
    assert max_abs(hawada_embeddings(again, folder, 64), theirs) < TOL
    # without trust_remote_code, transformers builds the stock class, whose shapes the sliced weights
    # do not fit: loading fails (it never gives a model with re-drawn weights)
    with pytest.raises(Exception, match="ignore_mismatched_sizes"):
        st.SentenceTransformer(folder, device="cpu")
    # `hawada export` re-saves the model and carries the tokenizer and the modules with it
    out = str(tmp_path / "exported")
    assert main(["export", folder, out]) == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(folder)) and not os.path.exists(out + ".partial")
    assert max_abs(st_embeddings(out, trust_remote_code=True), theirs) < TOL
    assert main(["export", folder, out]) == 2  # not empty: refused, nothing written


def test_writer_needs_no_sentence_transformers_and_names_the_modules(tmp_path) -> None:
    st_folder.write_st_folder(str(tmp_path), Pooling(("cls", "max"), False), 48, None)
    with open(tmp_path / "modules.json") as f:
        types = [m["type"] for m in json.load(f)]
    assert types == [st_folder.TRANSFORMER_TYPE, st_folder.POOLING_TYPE]
    with open(tmp_path / "1_Pooling" / "config.json") as f:
        assert json.load(f)["pooling_mode"] == ["cls", "max"]
    with open(tmp_path / "sentence_bert_config.json") as f:
        assert "max_seq_length" not in json.load(f)
    assert not (tmp_path / "2_Normalize").exists()
    # writing works where sentence-transformers cannot be imported (None in sys.modules blocks it)
    code = (
        "import sys; sys.modules['sentence_transformers'] = None\n"
        "from hawada.adapters import st_folder\n"
        "st_folder.write_st_folder(sys.argv[1], st_folder.Pooling(('mean',), True), 48, 32)\n"
        "assert st_folder.read_st_folder(sys.argv[1]).pooling == st_folder.Pooling(('mean',), True)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    blocked = tmp_path / "blocked"
    res = subprocess.run([sys.executable, "-c", code, str(blocked)], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (blocked / "2_Normalize" / "config.json").is_file()


def test_text_run_slim_folder_loads_in_sentence_transformers(tmp_path) -> None:
    """A shortened text run from the real MiniLM weights in a folder that declares first-token
    pooling without Normalize: ``slim/`` is a sentence-transformers folder with that pooling, and
    its ``encode`` gives the embeddings HawAda computes."""
    from hawada.run import optimize

    torch.set_num_threads(1)
    real = packaged_minilm_folder()
    src = tmp_path / "src"
    src.mkdir()
    for f in os.listdir(real):  # the real weights and tokenizer, the modules replaced below
        if f not in ("modules.json", "1_Pooling") and os.path.isfile(os.path.join(real, f)):
            os.symlink(os.path.join(real, f), src / f)
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text(
        json.dumps({"embedding_dimension": 384, "pooling_mode": "cls"})
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": st_folder.TRANSFORMER_TYPE},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": st_folder.POOLING_TYPE},
    ]
    (src / "modules.json").write_text(json.dumps(modules))
    out = tmp_path / "run"
    r = load_recipe(RECIPE, [f"model.path={src}", *smoke_overrides(out)])
    optimize(r, log=lambda s: None)
    slim_dir = str(out / "slim")
    spec = st_folder.read_st_folder(slim_dir)
    assert spec.pooling == Pooling(("cls",), False) and spec.max_seq_length == 32  # data.seq_len
    slim = hawada.load_slim(slim_dir)
    assert st_folder.pooling_of(slim) == Pooling(("cls",), False)
    ours = hawada_embeddings(slim, slim_dir, 32)
    theirs = st_embeddings(slim_dir, trust_remote_code=True)
    assert max_abs(ours, theirs) < TOL
    assert not torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-3)


def test_uniform_slim_loads_without_remote_code(tmp_path) -> None:
    """Every layer keeping the same widths (all heads, the same FFN groups closed): the stock config
    describes the model, and plain ``SentenceTransformer(path)`` loads it exactly."""
    g = hawada.attach(tiny_bert(), GateConfig(group_size={"ffn": 16}))
    store = hawada.gates(g)
    with torch.no_grad():
        store.logits.fill_(3.0)
        for i in range(3):
            s = store.segment(f"layer{i}.ffn")
            store.logits[s.start + 1 : s.start + 3] = -3.0
    g.eval()
    slim = hawada.export(g)
    assert stock_loadable(slim) and slim.config.intermediate_size == 68
    folder = str(tmp_path / "slim")
    HFEncoderAdapter().save(slim, folder)
    copy_tokenizer(folder)
    st_folder.write_st_folder(folder, st_folder.pooling_of(slim), slim.config.hidden_size, 64)
    theirs = st_embeddings(folder)
    assert max_abs(hawada_embeddings(slim, folder, 64), theirs) < TOL
