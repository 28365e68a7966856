"""How tests/data/main_numerics.pt was recorded: this script, run once against igdit main at commit 3e13311
(before the framework reshape of issue 10) with `PYTHONPATH=<that checkout> python record_main_numerics.py main_numerics.pt`.
It uses that commit's API and is kept as the record of what the stored values are; tests/test_parity_with_main.py
compares today's code with them."""
import torch, sys
from igdit.module import IGDiTModule
from igdit.models import SiT
from igdit.guidance import Denoiser, GuidanceRule
from igdit.samplers import euler_ode, heun_ode, euler_maruyama_sde

def perturbed(seed_init, seed_noise):
    torch.manual_seed(seed_init)
    m = IGDiTModule(name="SiT-T/2", exits=[2], input_size=8, in_channels=1, num_classes=10)
    torch.manual_seed(seed_init)
    m.backbone = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=3, num_heads=2, num_classes=10, exits=[2])
    g = torch.Generator().manual_seed(seed_noise)
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return m

m = perturbed(0, 1)
guide = perturbed(2, 3)
out = {"state_dict": {k: v.clone() for k, v in m.backbone.state_dict().items()},
       "guide_state_dict": {k: v.clone() for k, v in guide.backbone.state_dict().items()}}
g = torch.Generator().manual_seed(5)
x = torch.randn(4, 1, 8, 8, generator=g); t = torch.rand(4, generator=g); y = torch.tensor([0, 3, 7, 10])
o = m.backbone(x, t, y, exits=[2], hidden=[3])
out.update(x=x, t=t, y=y, final=o.final.detach(), exit2=o.exits[2].detach(), hidden3=o.hidden[3].detach())
gen = torch.Generator().manual_seed(7)
loss, terms = m.compute_loss(x, y, step=0, generator=gen)
out.update(loss=loss.detach(), loss_terms={k: v.detach() for k, v in terms.items()})
noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(9)); labels = torch.tensor([1, 2, 3, 4])
d = Denoiser(m.backbone, ig=GuidanceRule(1.4), cfg=GuidanceRule(1.35, (0.0, 0.7)))
out["euler_ig_cfg"] = euler_ode(d, noise, labels, steps=6)[0]
d = Denoiser(m.backbone, ig=GuidanceRule(1.4), cfg=GuidanceRule(1.35))
out["heun_ig_cfg_full"] = heun_ode(d, noise, labels, steps=6)[0]
d = Denoiser(m.backbone, ig=GuidanceRule(1.4, (0.3, 1.0)), cfg=GuidanceRule(1.35, (0.0, 0.7)), autoguidance=GuidanceRule(1.5, (0.1, 0.9)), guide=guide.backbone)
gens = [torch.Generator().manual_seed(100 + i) for i in range(4)]
step_noise = lambda: torch.stack([torch.randn(1, 8, 8, generator=q) for q in gens])
out["sde_ig_cfg_ag"] = euler_maruyama_sde(d, m.transport, noise, labels, steps=8, step_noise=step_noise)[0]
# three optimiser steps with warm-up
torch.manual_seed(0)
m2 = IGDiTModule(name="SiT-T/2", exits=[2], input_size=8, in_channels=1, num_classes=10, optimizer={"lr": 1e-3, "warmup_steps": 5})
m2.backbone = perturbed(11, 12).backbone
out["train_init_state_dict"] = {k: v.clone() for k, v in m2.backbone.state_dict().items()}
conf = m2.configure_optimizers(); opt, sch = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
losses = []
for step in range(3):
    l, _ = m2.compute_loss(x, y, step=step, generator=torch.Generator().manual_seed(20 + step))
    opt.zero_grad(); l.backward(); opt.step(); sch.step(); losses.append(l.detach())
out["train_losses"] = torch.stack(losses)
out["trained_state_dict"] = {k: v.clone() for k, v in m2.backbone.state_dict().items()}
torch.save(out, sys.argv[1])
print({k: (v.shape if hasattr(v, "shape") else type(v)) for k, v in out.items() if not k.endswith("state_dict")})
