"""What the cache costs and how fast it runs: FLOPs (FlopCounterMode), op and kernel counts, regional
torch.compile, attention backends and diffusers' own TaylorSeer hook as the peer. Imports ``core`` only."""
