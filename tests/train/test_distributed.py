"""Distributed training on CPU with gloo, 2 processes under torchrun: DDP and FSDP2 against one process, gradient
reductions per step, resume across world sizes (2 -> 1 and 1 -> 2).

Bit-identity (why the exact reference is 1 rank x batch b x 2 micro-batches): 2 ranks at batch b read the rows one
rank reads at batch 2b, but one forward/backward over 2b rows reduces each weight gradient over 2b*T products in one
matrix product, two ranks over b*T each and then add the halves, a different float summation order. One rank at batch
b with 2 micro-batches adds the same two halves (each scaled by 1/2, exact for a power of two) in the same order as the
all-reduce of 2 ranks, so that run must match to the bit, with gradient clipping inactive (its factor then clamps to
exactly 1): FSDP sums the gradient norm shard by shard, another order, so an active clip factor may differ in its
last bit (DDP clips the same full gradients; the accumulation runs clip and are compared within tolerance).

Against the batch-2b run the losses agree to float32 rounding (LOSS_RTOL) and the weights to WEIGHT_ATOL, except
where a gradient entry is itself rounding noise (a sum that cancels to ~1e-9, comparable to Adam's eps): Adam divides
it by its own magnitude and moves that weight by up to lr in a direction set by the noise. Those entries are bounded
by Adam's step (lr per step) and must stay a handful (NOISY_FRACTION).

All 2-rank runs happen in one torchrun launch (the module fixture) with a timeout, so a hang fails instead of blocking.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from revival.train import distributed
from revival.train.trainer import Trainer
from tests.train.conftest import RECURRENT_MODEL, tiny_run

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 240
BATCH = 2  # per rank
STEPS = 3
LR = 3e-2
LOSS_RTOL = 1e-5  # batch 2b vs 2 ranks x b: float32 summation order, then the noise-driven Adam steps of the
# docstring (measured up to 1.1e-6 by the third step); exact reductions are checked by the bit-identical tests
WEIGHT_ATOL = 1e-5  # measured: 31 of 35268 weights beyond it (Adam on noise-level gradients), the rest below 3e-6
NOISY_FRACTION = 0.002
NO_CLIP = 1e9  # train.grad_clip above any gradient norm here: clipping inactive
CLIP = 0.05  # train.grad_clip below every step's gradient norm here (checked): clipping active
CLIP_RTOL = 1e-6  # an active clip: FSDP's norm sums shard by shard, so its factor may differ in the last bits
TWO_RANK_RUNS = {  # name: (train.parallel, grad_accum, grad_clip, resume at step 2 from: None, "one_rank" or a run
    # of this launch)
    "ddp": ("ddp", 1, NO_CLIP, None), "fsdp": ("fsdp", 1, NO_CLIP, None),
    "ddp_accum": ("ddp", 2, 1.0, None), "fsdp_accum": ("fsdp", 2, 1.0, None),
    "fsdp_clip": ("fsdp", 1, CLIP, None),
    "ddp_resume": ("ddp", 1, NO_CLIP, "one_rank"), "fsdp_resume": ("fsdp", 1, NO_CLIP, "one_rank"),
    "fsdp_resume_fsdp": ("fsdp", 1, NO_CLIP, "fsdp"),
}


def run_config(out_dir, parallel="none", batch_size=BATCH, grad_accum=1, grad_clip=NO_CLIP):
    return tiny_run(out_dir, model=RECURRENT_MODEL, parallel=parallel, batch_size=batch_size, grad_accum=grad_accum,
                    grad_clip=grad_clip, steps=STEPS, checkpoint_every=2, lr=LR)


def record_clip_norms(trainer: Trainer) -> list[float]:
    """The gradient norms `trainer` clips from now on, one a step."""
    norms, clip = [], trainer._clip_gradients

    def recorded_clip():
        norms.append(clip().item())
        return norms[-1]

    trainer._clip_gradients = recorded_clip
    return norms


def copy_checkpoints_at_step_2(source, target) -> None:
    """`target` starts as `source`'s run stopped at step 2 (its checkpoints, latest pointing at step 2)."""
    shutil.copytree(Path(source) / "checkpoints", Path(target) / "checkpoints")
    point_latest_at(target, 2)


def corpus():
    from revival.data import make_corpus
    from tests.train.conftest import tiny_documents

    return make_corpus("tiny", tiny_documents(), validation_fraction=0.2, test_fraction=0.1)


def final_weights(out_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out_dir) / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"))


def point_latest_at(out_dir, step: int) -> None:
    (Path(out_dir) / "checkpoints" / "latest").write_text(f"step-{step:08d}\n")


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        difference = (actual[name] - expected[name]).abs().max().item()
        assert torch.equal(actual[name], expected[name]), f"{name}: max |difference| {difference:.3g}"


def assert_close_under_adam(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal up to float32 summation order, as far as Adam lets that be seen (module docstring)."""
    assert actual.keys() == expected.keys()
    difference = torch.cat([(actual[name] - expected[name]).abs().flatten() for name in expected])
    assert difference.max().item() <= LR * STEPS
    noisy = (difference > WEIGHT_ATOL).sum().item()
    assert noisy <= NOISY_FRACTION * difference.numel(), f"{noisy} of {difference.numel()} weights differ by more " \
        f"than {WEIGHT_ATOL}"


# -- the 2-rank worker (run by torchrun: python tests/train/test_distributed.py ROOT) ---------------------------------
def _count_reductions(trainer: Trainer) -> list[int]:
    """Calls of the gradient reduction (DDP all-reduce buckets, FSDP reduce-scatters) during training."""
    calls = [0]
    if trainer.world.parallel == "ddp":
        def hook(state, bucket):
            calls[0] += 1
            tensor = bucket.buffer().div_(trainer.world.world_size)
            return torch.distributed.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

        trainer.train_module.register_comm_hook(None, hook)
    else:
        original = torch.distributed.reduce_scatter_single

        def counted(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        torch.distributed.reduce_scatter_single = counted
    return calls


def _worker(root: Path) -> None:
    results = {}
    for name, (parallel, grad_accum, grad_clip, resume) in TWO_RANK_RUNS.items():
        if resume in results:  # a run of this launch: rank 0 copies its checkpoints while the others wait
            if torch.distributed.get_rank() == 0:
                copy_checkpoints_at_step_2(root / resume, root / name)
            torch.distributed.barrier()
        trainer = Trainer(run_config(root / name, parallel, grad_accum=grad_accum, grad_clip=grad_clip),
                          resume=resume is not None, corpus=corpus())
        calls = _count_reductions(trainer)
        summary = trainer.train()
        results[name] = {"losses": summary["losses"], "reductions": calls[0], "world_size": trainer.world.world_size,
                         "local_shard_adamw": isinstance(trainer.optimizer, distributed.LocalShardAdamW)}
    if trainer.world.is_main:
        (root / "results.json").write_text(json.dumps(results))
    distributed.shutdown(trainer.world)


# -- the fixture: the 1-rank references, then one 2-rank launch -------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The ranks run one thread each; so do the references here (a reduction split over threads sums in another
    order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("distributed")
    reference = Trainer(run_config(root / "one_rank", grad_accum=2), corpus=corpus()).train()
    batch_2b = {grad_accum: Trainer(run_config(root / f"one_rank_2b_accum{grad_accum}", batch_size=2 * BATCH,
                                               grad_accum=grad_accum, grad_clip=grad_clip), corpus=corpus()).train()
                for grad_accum, grad_clip in ((1, NO_CLIP), (2, 1.0))}  # the references of "ddp", "ddp_accum"
    for name, (_, _, _, resume) in TWO_RANK_RUNS.items():
        if resume == "one_rank":  # the 1-rank run's checkpoint at step 2, to be continued on 2 ranks
            copy_checkpoints_at_step_2(root / "one_rank", root / name)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, str(root)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return root, reference, batch_2b, json.loads((root / "results.json").read_text())


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_rank_bit_for_bit(runs, parallel):
    root, reference, _, results = runs
    assert results[parallel]["world_size"] == 2
    assert results[parallel]["losses"] == reference["losses"]
    assert_same(final_weights(root / parallel), final_weights(root / "one_rank"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_batch_b_match_one_rank_batch_2b(runs, parallel):
    root, _, batch_2b, results = runs
    torch.testing.assert_close(results[parallel]["losses"], batch_2b[1]["losses"], rtol=LOSS_RTOL, atol=0)
    assert_close_under_adam(final_weights(root / parallel), final_weights(root / "one_rank_2b_accum1"))


def test_fsdp_runs_step_adamw_on_local_shards(runs):
    _, _, _, results = runs
    assert {name: run["local_shard_adamw"] for name, run in results.items()} == {
        name: parallel == "fsdp" for name, (parallel, _, _, _) in TWO_RANK_RUNS.items()}


def test_two_ranks_active_clip_match_one_rank(runs):
    """2 ranks x batch b with the gradients clipped every step (on the local shards, norm summed over the mesh) and
    AdamW on the local shards, against 1 rank with torch's clip and AdamW on the same gradients: the clip factors
    differ in their last bits, the weights after step 1 by as little, and from step 2 on the gradient entries that
    are rounding noise differ with them, which Adam turns into steps of up to lr (module docstring)."""
    root, _, _, results = runs
    trainer = Trainer(run_config(root / "one_rank_clip", grad_accum=2, grad_clip=CLIP), corpus=corpus())
    norms = record_clip_norms(trainer)
    expected = trainer.train()["losses"]
    assert len(norms) == STEPS and min(norms) > 2 * CLIP  # the clip is active at every step
    torch.testing.assert_close(results["fsdp_clip"]["losses"], expected, rtol=CLIP_RTOL, atol=0)
    assert_close_under_adam(final_weights(root / "fsdp_clip"), final_weights(root / "one_rank_clip"))


@pytest.mark.parametrize("parallel, reductions_per_step", [("ddp", 1), ("fsdp", 3)])  # 1 bucket; 2 blocks + root
def test_accumulation_reduces_once_per_step(runs, parallel, reductions_per_step):
    root, _, batch_2b, results = runs
    run = results[f"{parallel}_accum"]
    assert run["reductions"] == reductions_per_step * STEPS
    torch.testing.assert_close(run["losses"], batch_2b[2]["losses"], rtol=LOSS_RTOL, atol=0)
    assert_close_under_adam(final_weights(root / f"{parallel}_accum"), final_weights(root / "one_rank_2b_accum2"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_resume_two_ranks_on_one(runs, tmp_path, parallel):
    root, reference, _, _ = runs
    shutil.copytree(root / parallel / "checkpoints", tmp_path / "checkpoints")
    point_latest_at(tmp_path, 2)
    assert (tmp_path / "checkpoints" / "step-00000002" / distributed.DCP_DIR).is_dir()
    summary = Trainer(run_config(tmp_path, grad_accum=2), resume=True, corpus=corpus()).train()
    assert summary["losses"] == reference["losses"][2:]
    assert_same(final_weights(tmp_path), final_weights(root / "one_rank"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_resume_one_rank_on_two(runs, parallel):
    root, reference, _, results = runs
    assert results[f"{parallel}_resume"]["losses"] == reference["losses"][2:]
    assert_same(final_weights(root / f"{parallel}_resume"), final_weights(root / "one_rank"))


def test_resume_two_ranks_fsdp_on_two_ranks_fsdp(runs):
    """The local-shard AdamW's state through dcp/ and back, sharded alike: the run continues bit-identically."""
    root, reference, _, results = runs
    assert results["fsdp_resume_fsdp"]["losses"] == reference["losses"][2:]
    assert_same(final_weights(root / "fsdp_resume_fsdp"), final_weights(root / "fsdp"))
    assert_same(final_weights(root / "fsdp_resume_fsdp"), final_weights(root / "one_rank"))



class SyncSwitch:
    """Records what `gradient_sync` asks of FSDP's switch (`FSDPModule.set_requires_gradient_sync`)."""

    def __init__(self):
        self.calls: list[bool] = []

    def set_requires_gradient_sync(self, requires_gradient_sync: bool) -> None:
        self.calls.append(requires_gradient_sync)


def test_fsdp_gradient_sync_sets_the_switch_only_to_turn_syncing_off():
    """Under FSDP, a syncing micro-batch leaves FSDP's switch alone (it is on outside the context; setting it walks
    every module, host time in every step); an accumulating one turns it off and back on, also when backward
    raises. The 2-rank accumulation runs check the reductions themselves (test_accumulation_reduces_once_per_step)."""
    world = distributed.World(parallel="fsdp", world_size=2)
    switch = SyncSwitch()
    with distributed.gradient_sync(switch, world, enabled=True):
        assert switch.calls == []
    assert switch.calls == []
    with distributed.gradient_sync(switch, world, enabled=False):
        assert switch.calls == [False]
    assert switch.calls == [False, True]
    with pytest.raises(RuntimeError), distributed.gradient_sync(switch, world, enabled=False):
        raise RuntimeError("backward failed")
    assert switch.calls == [False, True, False, True]


# -- one process: a group of one, in this process ----------------------------------------------------------------------
def test_fsdp_one_process_keeps_blocks_gathered_and_matches_plain(tmp_path, one_thread):
    """At world size 1 the blocks keep their gathered parameters from forward to backward (a shard is the whole
    parameter: resharding would only add copies), and training matches the plain trainer to the bit (fp32 on the CPU,
    clipping inactive; the reduction of one rank is the gradient itself)."""
    from torch.distributed.tensor import DTensor

    plain = Trainer(run_config(tmp_path / "none"), corpus=corpus())
    fsdp = Trainer(run_config(tmp_path / "fsdp", "fsdp"), corpus=corpus())
    try:
        assert fsdp.world.world_size == 1
        assert [plain.train_step() for _ in range(STEPS)] == [fsdp.train_step() for _ in range(STEPS)]
        block = fsdp.model.blocks[0]
        assert all(isinstance(param, DTensor) for param in block.parameters())  # resharded after backward
        with torch.no_grad():
            fsdp.train_module(fsdp.dataset.batch(0, BATCH).input_ids)
        assert not any(isinstance(param, DTensor) for param in block.parameters())  # still gathered after forward
        plain_state = plain.model.state_dict()
        for name, value in fsdp.model.state_dict().items():
            assert torch.equal(value.full_tensor() if isinstance(value, DTensor) else value, plain_state[name]), name
    finally:
        distributed.shutdown(fsdp.world)



def test_fsdp_clipping_on_local_shards_matches_torch_on_plain_gradients(tmp_path, one_thread):
    """`distributed.clip_grad_norm_` on FSDP's DTensor gradients (foreach over the local shards, then the mesh's sum)
    returns the norm torch's `clip_grad_norm_` computes on the same plain gradients, and scales them alike (an active
    clip: max_norm far below the norm)."""
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor

    plain = Trainer(run_config(tmp_path / "none"), corpus=corpus())
    fsdp = Trainer(run_config(tmp_path / "fsdp", "fsdp"), corpus=corpus())
    try:
        batch = plain.dataset.batch(0, BATCH)
        for trainer in (plain, fsdp):
            logits, _ = trainer.train_module(batch.input_ids)
            F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten()).backward()
        expected = torch.nn.utils.clip_grad_norm_(plain.model.parameters(), 1e-3)
        got = distributed.clip_grad_norm_(fsdp.model.parameters(), 1e-3)
        assert expected.item() > 1e-2  # the clip is active
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        plain_grads = {name: p.grad for name, p in plain.model.named_parameters()}
        for name, param in fsdp.model.named_parameters():
            assert isinstance(param.grad, DTensor), name
            torch.testing.assert_close(param.grad.full_tensor(), plain_grads[name], rtol=1e-5, atol=1e-9)
    finally:
        distributed.shutdown(fsdp.world)



class AdamTrainer(Trainer):
    """A Trainer whose AdamW is fused or not, and steps FSDP's DTensors on their local shards or through DTensor
    dispatch, as its class attributes say."""

    fused: bool | None = None
    local_shards: bool | None = None

    def _make_optimizer(self, fused: bool | None = None, local_shards: bool | None = None) -> torch.optim.Optimizer:
        return super()._make_optimizer(fused=self.fused, local_shards=self.local_shards)


def adam_trainer(out_dir, parallel="none", fused=None, local_shards=None, **config) -> Trainer:
    trainer_class = type("Trainer", (AdamTrainer,), {"fused": fused, "local_shards": local_shards})
    return trainer_class(run_config(out_dir, parallel, **config), corpus=corpus())


def full_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {name: value.full_tensor() if isinstance(value, DTensor) else value
            for name, value in trainer.model.state_dict().items()}


@pytest.mark.parametrize("local_shards", [False, True])
def test_fused_adamw_on_fsdp_shards_matches_foreach(tmp_path, one_thread, local_shards):
    """Fused AdamW (the default on CUDA) steps FSDP's shards, as DTensors or as their local tensors, as foreach AdamW
    (the CPU default) steps plain parameters, up to float32 rounding; torch's fused kernel runs on the CPU too."""
    plain = Trainer(run_config(tmp_path / "none"), corpus=corpus())
    fsdp = adam_trainer(tmp_path / "fsdp", "fsdp", fused=True, local_shards=local_shards)
    try:
        assert plain.optimizer.defaults["fused"] is None and fsdp.optimizer.defaults["fused"] is True
        assert isinstance(fsdp.optimizer, distributed.LocalShardAdamW) == local_shards
        losses = [fsdp.train_step() for _ in range(STEPS)]
        torch.testing.assert_close(losses, [plain.train_step() for _ in range(STEPS)], rtol=LOSS_RTOL, atol=0)
        assert_close_under_adam(full_weights(fsdp), plain.model.state_dict())
    finally:
        distributed.shutdown(fsdp.world)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("grad_clip", [NO_CLIP, CLIP])
def test_local_shard_adamw_matches_torch_adamw_on_plain_model(tmp_path, one_thread, monkeypatch, fused, grad_clip):
    """FSDP (a group of one) with AdamW on the local shards against the plain model with torch's AdamW, both fused or
    both foreach, 2 micro-batches a step, clipping off or active: no DTensor reaches torch's functional adam(), and
    the weights agree to the bit without a clip (the same elementwise update of the same gradients), the losses within
    CLIP_RTOL with one (FSDP's norm sums shard by shard) and the weights as far as Adam lets that be seen."""
    import importlib

    from torch.distributed.tensor import DTensor

    adam_module = importlib.import_module("torch.optim.adam")  # torch.optim's `adam` attribute is not the module
    plain = adam_trainer(tmp_path / "none", fused=fused, grad_accum=2, grad_clip=grad_clip)
    fsdp = adam_trainer(tmp_path / "fsdp", "fsdp", fused=fused, grad_accum=2, grad_clip=grad_clip)
    functional, seen = adam_module.adam, []

    def recorded(params, grads, exp_avgs, exp_avg_sqs, *args, **kwargs):
        seen.append([type(tensor) for tensor in (*params, *grads, *exp_avgs, *exp_avg_sqs)])
        return functional(params, grads, exp_avgs, exp_avg_sqs, *args, **kwargs)

    monkeypatch.setattr(adam_module, "adam", recorded)
    try:
        assert type(plain.optimizer) is torch.optim.AdamW and isinstance(fsdp.optimizer, distributed.LocalShardAdamW)
        norms = record_clip_norms(plain)
        expected = [plain.train_step() for _ in range(STEPS)]
        assert 2 * CLIP < min(norms) and max(norms) < NO_CLIP  # CLIP clips every step, NO_CLIP none
        seen.clear()
        losses = [fsdp.train_step() for _ in range(STEPS)]
        assert len(seen) == 2 * STEPS and all(seen)  # two groups a step, every tensor of both seen
        assert not any(issubclass(kind, DTensor) for kinds in seen for kind in kinds)
        assert all(isinstance(state["exp_avg"], DTensor) for state in fsdp.optimizer.state.values())  # torch's form
        weights, reference = full_weights(fsdp), plain.model.state_dict()
        if grad_clip == NO_CLIP:
            assert losses == expected
            assert_same(weights, reference)
        else:
            torch.testing.assert_close(losses, expected, rtol=CLIP_RTOL, atol=0)
            # the clip factor's last bits rescale every gradient, noise-level entries included, which Adam then
            # moves by up to lr (module docstring): on an AMD EPYC host 28 of gate_bias's 128 entries by up to 1e-5
            assert_close_under_adam(weights, reference)
    finally:
        distributed.shutdown(fsdp.world)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
