"""examples/digits_demo.py: every optimizer lowers the loss of the digits MLP (a short run),
the ensemble helper averages its members, the plot and the progress bars work."""

from __future__ import annotations

import builtins
import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

DEMO = Path(__file__).resolve().parents[1] / "examples" / "digits_demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("digits_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results(demo):
    return demo.run(demo.parse_args(["--epochs", "3", "--ensemble", "3", "--no-progress"]))


def test_every_optimizer_lowers_the_loss(demo, results):
    assert set(demo.OPTIMIZERS) <= set(results)
    for name in demo.OPTIMIZERS:
        loss = results[name]["loss"]
        assert np.isfinite(loss).all(), name
        assert loss[-1] < 0.7 * loss[0], (name, loss)
        assert results[name]["test_acc"] > 0.5, name


def test_ensemble_is_trained_and_scored(results):
    ens = results["ensemble"]
    assert ens["members"] == 3 and ens["test_acc"] > 0.8 and ens["member_test_acc"] > 0.8
    assert ens["loss"][-1] < np.log(10)


def test_gradients_are_right(demo, rng):
    """The MLP's analytic gradients against central differences, one model and stacked."""
    x, y = rng.random((5, 6)), rng.integers(0, 10, 5)
    params = demo.init_params([6, 4, 10], rng)
    _, grads = demo.loss_and_grads(params, x, y)
    for j, p in enumerate(params):
        for idx in [(0,) * p.ndim, tuple(s - 1 for s in p.shape)]:
            old = p[idx]
            p[idx] = old + 1e-6
            up = demo.loss_and_grads(params, x, y)[0]
            p[idx] = old - 1e-6
            down = demo.loss_and_grads(params, x, y)[0]
            p[idx] = old
            assert grads[j][idx] == pytest.approx((up - down) / 2e-6, rel=1e-5, abs=1e-8)
    stacked = [np.stack([p, 2 * p]) for p in params]
    losses, sgrads = demo.loss_and_grads(stacked, x, y)
    assert losses.shape == (2,) and losses[0] == pytest.approx(demo.loss_and_grads(params, x, y)[0])
    for g, sg in zip(grads, sgrads):
        np.testing.assert_allclose(sg[0], g, rtol=1e-12, atol=1e-15)
    probs = demo.ensemble_predict(stacked, x)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(probs, demo.softmax(demo.forward(stacked, x)[0]).mean(axis=0))


def test_main_prints_the_table_and_writes_the_plot(demo, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "loss.png"
    demo.main(["--epochs", "1", "--optimizers", "adam,lbfgs", "--ensemble", "0",
               "--no-progress", "--plot", str(path)])
    out = capsys.readouterr().out
    assert "| Adam |" in out and "| L-BFGS |" in out and "test accuracy" in out
    assert path.stat().st_size > 1000


def test_text_bar_without_tqdm(demo, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    bar = demo.progress_bar(4)
    assert isinstance(bar, demo.TextBar)
    bar.set_postfix_str("Adam: loss 0.5")
    bar.update(2)
    bar.close()
    err = capsys.readouterr().err
    assert "[###############...............] 2/4 Adam: loss 0.5" in err


def test_unknown_optimizer(demo):
    with pytest.raises(SystemExit, match="unknown optimizers"):
        demo.run(demo.parse_args(["--optimizers", "adamax", "--no-progress"]))
