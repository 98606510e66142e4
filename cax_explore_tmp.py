import json, sys, time, os
import torch
torch.set_num_threads(1)
from lablib.tasks import causal_axioms as ca
name, over = sys.argv[1], json.loads(sys.argv[2])
out_dir = os.environ.get("OUT", "/tmp/cax")
log = sys.stdout
over.setdefault("num_threads", 1)
cfg = ca.CausalAxiomsConfig.resolve("cpu", eval_chain_lengths=[7, 8, 9, 10, 15], reversed_lengths=[5], branching_nodes=[8],
                                    branching_factors=[1.4], eval_examples=200, **over)
t = time.time()
plain = ca.accuracy
def logged(*a, **k):
    v = plain(*a, **k); print(f"{name} {time.time()-t:.0f}s {v:.3f}", file=log, flush=True); return v
ca.accuracy = logged
model, tok, res = ca.train_model(cfg, None, progress=False)
ca.accuracy = plain
tt = time.time() - t
acc = ca.evaluate_sets(model, tok, ca.evaluation_sets(cfg), 128, progress=False)
out = {"name": name, "train_s": round(tt, 1), "s_per_step": round(tt / cfg.steps, 4),
       **{k: round(v, 3) for k, v in ca.flat_accuracies(acc).items() if k.count("/") == 1 or "/chain/" in k}}
print(json.dumps(out), file=log, flush=True)
