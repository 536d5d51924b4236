"""One csr training step of the reference MLP (epsilon = 20, batch 128), wall time, median of 40
steps: run it while other processes keep the cores busy, with and without a passive OpenMP wait
policy, e.g.

    python -c "while True: pass" &   # one busy process per core not otherwise used
    env -u OMP_WAIT_POLICY python benchmarks/under_load.py 2
    OMP_WAIT_POLICY=PASSIVE python benchmarks/under_load.py 2
    OMP_WAIT_POLICY=PASSIVE python benchmarks/under_load.py 1
"""

import os, sys, time
import torch, torch.nn.functional as F
import synthprune
threads = int(sys.argv[1]); torch.set_num_threads(threads)
torch.manual_seed(0)
model = synthprune.SparseMLP([784,1000,1000,1000,10], epsilon=20, seed=0)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x = torch.randn(128,784); y = torch.randint(0,10,(128,))
def step():
    opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
for _ in range(5): step()
ts=[]
for _ in range(40):
    t=time.perf_counter(); step(); ts.append(time.perf_counter()-t)
print(f"policy={os.environ.get('OMP_WAIT_POLICY','default')} threads={threads}: {1e3*sorted(ts)[20]:.1f} ms wall per step")
