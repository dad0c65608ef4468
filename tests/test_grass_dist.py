"Grass on torch.distributed: 2 gloo processes on CPU reach the weights of 1 process on the concatenated batch."
import os, sys, socket
from pathlib import Path
import pytest, torch
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
    sent = r0['sent']
    assert sent[0] == dense_rest + tgt_full == ddp   # step 0: every layer makes its first selection from its full gradient
    assert min(sent[1:]) >= dense_rest + compact and all(s < ddp for s in sent[1:]), (sent, ddp)
    print(f'{selection}: bytes all-reduced per step {sent} vs plain DDP {ddp} (compact-only step: {dense_rest + compact})')
