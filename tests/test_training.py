"""The training pieces the bundled models share: warm-up + cosine learning rate, EMA of the weights."""

import math

import pytest
import torch

from taylorseer.harness.training import ema_update, warmup_cosine_lr


def test_warmup_then_cosine_to_the_floor():
    lr = [warmup_cosine_lr(s, total=1000, lr=1e-3, warmup=100, min_lr=1e-5) for s in range(1001)]
    assert lr[0] == pytest.approx(1e-5) and lr[99] == pytest.approx(1e-3)  # linear warm-up, peak at its end
    assert lr[100] == pytest.approx(1e-3) and lr[1000] == pytest.approx(1e-5)
    assert lr[550] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half-way down the cosine
    assert all(a >= b for a, b in zip(lr[100:], lr[101:], strict=False))
    assert not math.isnan(warmup_cosine_lr(5, total=5, lr=1.0, warmup=5, min_lr=0.0))


def test_ema_update_is_the_weighted_average():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for e, b, m in zip(ema.parameters(), before, model.parameters(), strict=True):
        assert torch.allclose(e, 0.9 * b + 0.1 * m)


def test_train_steps_resumed_after_a_kill_gives_the_same_weights(tmp_path):
    from taylorseer.harness.training import load_resume, save_resume, train_steps

    def run(kill_at=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        ema = torch.nn.Linear(4, 1).requires_grad_(False)
        ema.load_state_dict(model.state_dict())
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        path = tmp_path / "run.resume.pt"
        state, start, losses = load_resume(path), 0, []
        if state is not None:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            g.set_state(state["generator"])
            start, losses = state["step"], state["losses"]

        def loss_at(step):
            if step == kill_at:
                raise KeyboardInterrupt
            x = torch.randn(8, 4, generator=g)
            return (model(x) - x.sum(1, keepdim=True)).pow(2).mean()

        def save(step):
            save_resume(path, dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                   generator=g.get_state(), step=step, losses=losses))

        train_steps(model, opt, loss_at, start=start, steps=10, losses=losses, lr_at=lambda s: 0.1 / (s + 1),
                    save=save, save_every=3, desc="test", ema=ema, ema_decay=0.9, clip=1.0)
        path.unlink(missing_ok=True)
        return ema.weight.clone(), losses

    straight, straight_losses = run()
    with pytest.raises(KeyboardInterrupt):
        run(kill_at=7)  # resume state written after steps 3 and 6
    resumed, resumed_losses = run()
    assert torch.equal(straight, resumed) and straight_losses == resumed_losses and len(resumed_losses) == 10
