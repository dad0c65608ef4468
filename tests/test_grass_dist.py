"Grass on torch.distributed without a wrapper: 2 gloo processes on CPU reach the weights of 1 process on the concatenated batch."
import os, sys, socket
from pathlib import Path
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import torch.distributed as dist, torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM
from memnb.grass import Grass, grass_model, grass_param_groups

STEPS, B, T, V = 5, 8, 16, 64

def _free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _make(selection):
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=4, max_position_embeddings=T))
    grass_model(m)
    return m, Grass(grass_param_groups(m, rank=8, update_proj_gap=2, selection=selection), lr=1e-2, seed=7)

def _data():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (B, T), generator=g) for _ in range(STEPS)]

def _train(model, opt, world=1, rank=0):
    sent = []
    for x in _data():
        xb = x.chunk(world)[rank]
        model(input_ids=xb, labels=xb).loss.backward()
        opt.step(); opt.zero_grad(); sent.append(opt.comm_bytes)
    return sent

def _worker(rank, world, port, selection, out):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    try:
        model, opt = _make(selection)
        sent = _train(model, opt, world, rank)
        torch.save(dict(state=model.state_dict(), sent=sent, idx=[opt.state[p]['idx'] for p in opt.targeted]), f'{out}.{rank}')
    finally: dist.destroy_process_group()

@pytest.mark.parametrize('selection', ['top', 'multinomial'])
def test_two_gloo_ranks_equal_one_process(tmp_path, selection):
    os.environ['PYTHONPATH'] = os.pathsep.join([str(Path(__file__).parent), os.environ.get('PYTHONPATH', '')])  # spawned children import this file
    out = str(tmp_path/'w')
    mp.spawn(_worker, args=(2, _free_port(), selection, out), nprocs=2, join=True)
    ref, ropt = _make(selection); _train(ref, ropt)
    r0, r1 = torch.load(f'{out}.0'), torch.load(f'{out}.1')
    for k, v in ref.state_dict().items():
        assert torch.equal(r0['state'][k], r1['state'][k]), f'ranks disagree on {k}'
        torch.testing.assert_close(r0['state'][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f'{k}: {m}')
    for a, b in zip(r0['idx'], [ropt.state[p]['idx'] for p in ropt.targeted]): assert torch.equal(a, b)
    # bytes all-reduced per step vs plain DDP (every parameter's dense gradient)
    ddp = sum(p.numel() * p.element_size() for p in ref.parameters())
    compact = sum(ropt.state[p]['exp_avg'].numel() * 4 for p in ropt.targeted)
    dense_rest = sum(p.numel() * 4 for p in ref.parameters() if all(p is not q for q in ropt.targeted))
    tgt_full = sum(p.numel() * 4 for p in ropt.targeted)
    mask = 4 * sum(1 for p in ref.parameters())    # the presence mask: one int32 per parameter, all-reduced first
    sent = r0['sent']
    assert sent[0] == mask + dense_rest + tgt_full == mask + ddp   # step 0: every layer makes its first selection from its full gradient
    assert min(sent[1:]) >= mask + dense_rest + compact and all(s < ddp for s in sent[1:]), (sent, ddp)
    print(f'{selection}: bytes all-reduced per step {sent} vs plain DDP {ddp} (compact-only step: {dense_rest + compact})')


# A parameter with a gradient on one rank only (targeted and dense), one with a gradient on no rank, and bf16 weights
# next to fp32 ones in the flat all-reduce.
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(V, 16), nn.Linear(24, V)
        self.mlp = nn.Linear(16, 24).bfloat16()         # targeted, bf16
        self.mlp_extra = nn.Linear(24, 24)              # targeted, fp32: used on rank 0's half only
        self.extra = nn.Linear(24, 24)                  # dense: used on rank 0's half only
        self.unused = nn.Linear(24, 24)                 # dense: never used
    def forward(self, x, use_extra):
        h = torch.relu(self.mlp(self.emb(x).bfloat16())).float()
        if use_extra: h = h + self.mlp_extra(h) + self.extra(h)
        return F.cross_entropy(self.head(h).flatten(0, 1), x.flatten())

def _make_net():
    net = _Net(); grass_model(net, targets=('mlp',))
    return net, Grass(grass_param_groups(net, rank=6, targets=('mlp',), update_proj_gap=2), lr=1e-2)

def _uneven_worker(rank, world, port, out):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    try:
        net, opt = _make_net(); sent = []
        for x in _data():
            net(x.chunk(world)[rank], use_extra=rank == 0).backward(); opt.step(); opt.zero_grad(); sent.append(opt.comm_bytes)
        torch.save(dict(state=net.state_dict(), sent=sent), f'{out}.{rank}')
    finally: dist.destroy_process_group()

def test_uneven_gradients_and_mixed_dtypes(tmp_path):
    os.environ['PYTHONPATH'] = os.pathsep.join([str(Path(__file__).parent), os.environ.get('PYTHONPATH', '')])
    out = str(tmp_path/'u')
    mp.spawn(_uneven_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ref, ropt = _make_net(); init = {k: v.clone() for k, v in ref.state_dict().items()}
    for x in _data():   # the same global batch in 1 process: the mean of the two halves' losses
        a, b = x.chunk(2); ((ref(a, use_extra=True) + ref(b, use_extra=False)) / 2).backward(); ropt.step(); ropt.zero_grad()
    r0, r1 = torch.load(f'{out}.0'), torch.load(f'{out}.1')
    for k, v in ref.state_dict().items():
        assert torch.equal(r0['state'][k], r1['state'][k]), f'ranks disagree on {k}'
        tol = dict(rtol=1e-2, atol=1e-3) if v.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r0['state'][k], v, **tol, msg=lambda m: f'{k}: {m}')
    for k in ('unused.weight', 'unused.bias'): assert torch.equal(r0['state'][k], init[k])   # no gradient anywhere: not updated
    assert all(p not in ropt.state for p in ref.unused.parameters())
    n_params = sum(1 for p in ref.parameters())
    used = sum(p.numel() * p.element_size() for n, p in ref.named_parameters() if not n.startswith('unused'))
    assert r0['sent'][0] == 4 * n_params + used, r0['sent']   # step 0: mask + every used gradient in its own dtype (bf16: 2 bytes)
