"""Cached routing priors: file contents vs an independent computation, validation against the
model, and training with priors == training against live anchors."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from helpers import run_ranks  # noqa: E402
from hf_train_helpers import one_thread, TOKENIZER, assert_updates_close, pairs, sgd_args, tiny_moe, train_delta  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sara_kernels.hf import RoutingPriors, extract_routing_priors, load_routing_priors  # noqa: E402
from sara_kernels.testing import PROBS_TOL  # noqa: E402



_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

def independent_priors(model, data, temperature=1.0):
    """[N, L, E]: each anchor alone (no padding), transformers' own router_logits, plain softmax."""
    rows = []
    with torch.no_grad():
        for example in data:
            ids = torch.tensor([TOKENIZER(example["anchor"])["input_ids"]])
            out = model(input_ids=ids, output_router_logits=True, use_cache=False)
            rows.append(torch.stack([torch.softmax(z.double() / temperature, -1).mean(0) for z in out.router_logits]))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def model():
    return tiny_moe().eval()


def test_extract_writes_distributions_and_metadata(model, tmp_path):
    data = pairs(7)
    path = tmp_path / "priors.safetensors"
    priors = extract_routing_priors(model, data, TOKENIZER, path, temperature=2.0, batch_size=3, progress=False)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        stored = f.get_tensor("priors")
    assert stored.shape == (7, 2, 4) and stored.dtype == torch.float32
    torch.testing.assert_close(stored.double(), independent_priors(model, data, 2.0), rtol=1e-5, atol=1e-6)
    assert json.loads(meta["layers"]) == [1, 2]  # decoder indices (layer 0 is dense)
    assert (meta["num_experts"], meta["score"], float(meta["temperature"]), meta["num_examples"]) == ("4", "softmax", 2.0, "7")
    assert meta["model_type"] == "qwen3_moe"
    assert priors.layers == (1, 2) and priors.num_examples == 7
    assert model.training is False  # mode restored (it was eval)


def test_load_validates_against_model(model, tmp_path):
    path = tmp_path / "p.safetensors"
    extract_routing_priors(model, pairs(4), TOKENIZER, path, progress=False)
    loaded = load_routing_priors(path, model=model)
    assert loaded.layers == (1, 2) and loaded.score == "softmax" and loaded.num_experts == 4
    assert load_routing_priors(path, model=model, layers=[2]).layers == (1, 2)

    with pytest.raises(ValueError, match=r"E = 4 experts but the model's routers have E = 6"):
        load_routing_priors(path, model=tiny_moe(num_experts=6))
    with pytest.raises(ValueError, match=r"layers \[1\] of this model are not MoE layers"):
        load_routing_priors(path, model=tiny_moe(mlp_only_layers=(0, 1)))
    with pytest.raises(ValueError, match=r"score='sigmoid' but the priors .* score='softmax'"):
        load_routing_priors(path, model=model, score="sigmoid")
    with pytest.raises(ValueError, match=r"layers \[3\] are trained"):
        load_routing_priors(path, layers=[1, 3])
    with pytest.raises(ValueError, match="only be resolved"):
        load_routing_priors(path, layers="middle")


def test_load_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_routing_priors(tmp_path / "missing.safetensors")
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a SARA routing-priors file"):
        load_routing_priors(other)
    no_layers = tmp_path / "no_layers.safetensors"
    save_file({"priors": torch.zeros(2, 1, 4)}, str(no_layers), metadata={"format": "sara-routing-priors", "version": "1"})
    with pytest.raises(ValueError, match="malformed priors metadata"):
        load_routing_priors(no_layers)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="safetensors"):
        load_routing_priors(garbage)


def test_gather_selects_examples_and_layers():
    probs = torch.arange(3 * 2 * 4, dtype=torch.float32).reshape(3, 2, 4)
    priors = RoutingPriors(probs=probs, layers=(5, 7), score="softmax", temperature=1.0)
    got = priors.gather(torch.tensor([2, 0]), layers=[7])
    assert got.shape == (1, 2, 4)
    assert torch.equal(got[0, 0], probs[2, 1]) and torch.equal(got[0, 1], probs[0, 1])
    with pytest.raises(ValueError, match="outside the 3 cached priors"):
        priors.gather(torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"layers \[6\] are not in the priors file"):
        priors.gather(torch.tensor([0]), layers=[6])


def test_training_with_priors_equals_live_anchors(tmp_path):
    """extract → file → train (k = 2) gives the same update as training against live anchors,
    without any anchor forward; perturbed priors give a different one (the check can fail)."""
    base, data = tiny_moe(), pairs(8)
    path = tmp_path / "priors.safetensors"
    extract_routing_priors(base, data, TOKENIZER, path, batch_size=3, progress=False)
    common = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    live, _ = train_delta(base, tmp_path, data, **common)
    cached, trainer = train_delta(base, tmp_path, data, routing_priors=str(path), **common)
    assert trainer.data_collator.include_anchor is False  # batches carry the targets only
    assert_updates_close(cached, live, rtol=1e-4)
    # Evaluation never uses the priors (eval examples index another dataset): SARA on live anchors.
    metrics = trainer.evaluate(eval_dataset=data)
    _, live_trainer = train_delta(base, tmp_path, data, **common)
    live_metrics = live_trainer.evaluate(eval_dataset=data)
    assert metrics["eval_sara_loss"] == pytest.approx(live_metrics["eval_sara_loss"], rel=1e-5)
    assert metrics["eval_lm_loss"] == pytest.approx(live_metrics["eval_lm_loss"], rel=1e-5)

    priors = load_routing_priors(path)
    priors.probs = torch.roll(priors.probs, shifts=1, dims=0)  # priors of the wrong examples
    priors.fingerprint = ""  # (the fingerprint check would refuse them otherwise)
    wrong, _ = train_delta(base, tmp_path, data, routing_priors=priors, **common)
    gate = "model.layers.2.mlp.gate.weight"
    assert (wrong[gate] - live[gate]).abs().max() > 1e-2 * live[gate].abs().max()


def test_priors_must_match_the_dataset_and_options(tmp_path):
    from sara_kernels.hf import SARATrainer

    from hf_train_helpers import sgd_args

    base, data = tiny_moe(), pairs(8)
    path = tmp_path / "priors.safetensors"
    extract_routing_priors(base, data, TOKENIZER, path, progress=False)
    reordered = data[1:] + data[:1]
    with pytest.raises(ValueError, match=r"other anchors \(or the same in another order\)"):
        SARATrainer(model=base, args=sgd_args(tmp_path), train_dataset=reordered, processing_class=TOKENIZER, routing_priors=str(path))
    with pytest.raises(ValueError, match="hold 8 examples but train_dataset has 4"):
        SARATrainer(model=base, args=sgd_args(tmp_path), train_dataset=data[:4], processing_class=TOKENIZER, routing_priors=str(path))
    with pytest.raises(ValueError, match="temperature 1.0, but sara_temperature = 2.0"):
        SARATrainer(model=base, args=sgd_args(tmp_path, sara_temperature=2.0), train_dataset=data,
                    processing_class=TOKENIZER, routing_priors=str(path))
    with pytest.raises(ValueError, match="E = 4 experts but the model's routers have E = 6"):
        SARATrainer(model=tiny_moe(num_experts=6), args=sgd_args(tmp_path), train_dataset=data,
                    processing_class=TOKENIZER, routing_priors=str(path))
    with pytest.raises(ValueError, match="sara_detach_anchor=False needs live anchors"):
        SARATrainer(model=base, args=sgd_args(tmp_path, sara_detach_anchor=False), train_dataset=data,
                    processing_class=TOKENIZER, routing_priors=str(path))


def test_extract_bad_inputs(model, tmp_path):
    with pytest.raises(ValueError, match=r"pairs\[1\]: missing key\(s\) \['anchor'\]"):
        extract_routing_priors(model, [pairs(1)[0], {"target": "the dog"}], TOKENIZER, tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="no examples"):
        extract_routing_priors(model, [], TOKENIZER, tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="temperature"):
        extract_routing_priors(model, pairs(2), TOKENIZER, tmp_path / "x", temperature=0, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        extract_routing_priors(model, pairs(2), TOKENIZER, tmp_path / "x", temperature=float("inf"), progress=False)


def test_priors_record_max_length_and_must_match_sara_max_length(tmp_path):
    """The file records the anchors' truncation; training at another sara_max_length is refused
    (its live anchors would differ), training at the same one equals live anchors."""
    from sara_kernels.hf import SARATrainer

    from hf_train_helpers import sgd_args

    base, data = tiny_moe(), pairs(8)
    short, full = tmp_path / "short.safetensors", tmp_path / "full.safetensors"
    extract_routing_priors(base, data, TOKENIZER, short, max_length=3, progress=False)
    extract_routing_priors(base, data, TOKENIZER, full, progress=False)
    for path, stored, value in ((short, "3", 3), (full, "null", None)):
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["max_length"] == stored
        assert load_routing_priors(path).max_length == value
    # Truncation changes the anchors' routing, so the two files really differ.
    assert not torch.allclose(load_routing_priors(short).probs, load_routing_priors(full).probs)

    with pytest.raises(ValueError, match=r"extracted with max_length=3, but sara_max_length = None"):
        SARATrainer(model=base, args=sgd_args(tmp_path), train_dataset=data, processing_class=TOKENIZER,
                    routing_priors=str(short))
    with pytest.raises(ValueError, match=r"extracted with max_length=None, but sara_max_length = 3"):
        SARATrainer(model=base, args=sgd_args(tmp_path, sara_max_length=3), train_dataset=data,
                    processing_class=TOKENIZER, routing_priors=str(full))
    with pytest.raises(ValueError, match=r"extracted with max_length=3, but sara_max_length = 4"):
        SARATrainer(model=base, args=sgd_args(tmp_path, sara_max_length=4), train_dataset=data,
                    processing_class=TOKENIZER, routing_priors=load_routing_priors(short))

    live, _ = train_delta(base, tmp_path, data, sara_max_length=3)
    cached, _ = train_delta(base, tmp_path, data, sara_max_length=3, routing_priors=str(short))
    assert_updates_close(cached, live, rtol=1e-4)

    # A file without the field (written before it was recorded) is refused, not read as "no truncation".
    with safe_open(str(full), framework="pt") as f:
        meta, probs = dict(f.metadata()), f.get_tensor("priors")
    for value, match in ((None, "no 'max_length'"), ("0", "max_length must be a positive int or null"),
                         ("true", "max_length must be a positive int or null"), ("x", "positive int or null")):
        old = tmp_path / "old.safetensors"
        if value is None:
            meta.pop("max_length")
        else:
            meta["max_length"] = value
        save_file({"priors": probs}, str(old), metadata=meta)
        with pytest.raises(ValueError, match=match):
            load_routing_priors(old)


def _extract_on_rank(rank: int, folder: str):
    priors = extract_routing_priors(tiny_moe().eval(), pairs(7), TOKENIZER, f"{folder}/sharded.safetensors",
                                    batch_size=2, progress=False)
    # The file exists when extract returns, on every rank.
    loaded = load_routing_priors(f"{folder}/sharded.safetensors")
    torch.save((priors.probs, loaded.probs), f"{folder}/rank{rank}.pt")


def test_extraction_under_torch_distributed_equals_one_process(model, tmp_path):
    """2 gloo processes each extract every other anchor; the gathered file, written once by
    rank 0, equals a single-process extraction, and every rank returns the whole priors."""
    expected = extract_routing_priors(model, pairs(7), TOKENIZER, tmp_path / "single.safetensors", batch_size=2,
                                      progress=False)
    run_ranks(_extract_on_rank, 2, str(tmp_path))
    for rank in range(2):
        returned, from_file = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(returned, from_file)
        # Other batches pad to other lengths: equal up to fp32 rounding of the model's matmuls.
        torch.testing.assert_close(returned, expected.probs, **PROBS_TOL)


def test_priors_with_an_iterable_dataset_are_refused_when_the_trainer_is_built(model, tmp_path):
    from sara_kernels.hf import SARATrainer

    class Pairs(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(pairs(4))

    path = tmp_path / "p.safetensors"
    extract_routing_priors(model, pairs(4), TOKENIZER, path, progress=False)
    with pytest.raises(ValueError, match="routing_priors need a map-style train_dataset"):
        SARATrainer(model=tiny_moe(), args=sgd_args(tmp_path), train_dataset=Pairs(), processing_class=TOKENIZER,
                    routing_priors=str(path))

