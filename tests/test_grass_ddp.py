"""Grass on the standard wrappers: `DistributedDataParallel` and accelerate's `Accelerator`, 2 gloo processes on CPU,
against 1 process on the same global batch; bytes all-reduced per step counted (DDP's by a communication hook, Grass's
by `comm_bytes`).

`accelerate launch` is not used: for several CPU processes it starts them through `mpirun` (`--mpirun_hostfile`;
without it, a MULTI_CPU config launches a single process), and `mpirun` is not installed here. The accelerate test
starts the 2 processes with `torch.multiprocessing` and the environment a launcher sets (RANK, WORLD_SIZE,
MASTER_ADDR, ...); `Accelerator()` then builds the gloo process group and the DDP wrapper it builds under the
launcher."""
import os, sys, gc, socket, contextlib
from pathlib import Path
import pytest, torch
import torch.distributed as dist, torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from transformers import LlamaConfig, LlamaForCausalLM
from memnb.grass import Grass, grass_model, grass_param_groups

STEPS, B, T, V, ACCUM, CLIP = 5, 8, 16, 64, 2, 0.5

def _free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _make(seed=0):
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=4, max_position_embeddings=T))
    grass_model(m)   # also makes DDP ignore the targeted weights
    return m, Grass(grass_param_groups(m, rank=8, update_proj_gap=2), lr=1e-2)

def _data():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (B, T), generator=g) for _ in range(STEPS)]

def _reference(clip=None):
    "1 process, the whole global batch per step."
    ref, ropt = _make()
    for x in _data():
        ref(input_ids=x, labels=x).loss.backward()
        if clip: ropt.clip_grad_norm_(clip)
        ropt.step(); ropt.zero_grad()
    return ref, ropt

def _counting_hook(counter):
    "DDP's default all-reduce, counting the bytes of every bucket into counter[-1]."
    def hook(state, bucket):
        counter[-1] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)
    return hook

def _run(rank, world, port, body, *args):
    "Init gloo, run `body`, then destroy the process group only after `body`'s DDP wrapper is gone (a live DDP reducer can hang the teardown)."
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    try: body(rank, world, *args)
    finally: gc.collect(); dist.destroy_process_group()

def _spawn(fn, *args):
    os.environ['PYTHONPATH'] = os.pathsep.join([str(Path(__file__).parent), os.environ.get('PYTHONPATH', '')])  # spawned children import this file
    mp.spawn(fn, args=(2, _free_port(), *args), nprocs=2, join=True)

def _check(out, ref, ropt, rtol=1e-5, atol=1e-6):
    r0, r1 = torch.load(f'{out}.0'), torch.load(f'{out}.1')
    for k, v in ref.state_dict().items():
        assert torch.equal(r0['state'][k], r1['state'][k]), f'ranks disagree on {k}'
        torch.testing.assert_close(r0['state'][k], v, rtol=rtol, atol=atol, msg=lambda m: f'{k}: {m}')
    n = sum(1 for _ in ref.parameters())
    tgt = {id(p) for p in ropt.targeted}
    sizes = dict(ddp=sum(p.numel() * 4 for p in ref.parameters()),   # plain DDP: every gradient, every step
                 dense=sum(p.numel() * 4 for p in ref.parameters() if id(p) not in tgt),
                 tgt_full=sum(p.numel() * 4 for p in ropt.targeted),
                 compact=sum(ropt.state[p]['exp_avg'].numel() * 4 for p in ropt.targeted), n=n, n_tgt=len(tgt))
    return r0, sizes

def _ddp_worker(rank, world, port, mode, out): _run(rank, world, port, _ddp_body, mode, out)

def _ddp_body(rank, world, mode, out):
    model, opt = _make()
    ddp = DDP(model); ddp_bytes, sent = [], []
    ddp.register_comm_hook(None, _counting_hook(ddp_bytes))
    for x in _data():
        ddp_bytes.append(0)
        for i, mb in enumerate(x.chunk(world)[rank].chunk(ACCUM)):   # gradient accumulation: DDP syncs on the last micro-batch
            sync = mode == 'ddp' and i == ACCUM - 1
            with (contextlib.nullcontext() if sync else ddp.no_sync()):
                (ddp(input_ids=mb, labels=mb).loss / ACCUM).backward()
        modes = opt._sync_mode()
        opt.step(); opt.zero_grad(); sent.append(opt.comm_bytes)
    torch.save(dict(state=model.state_dict(), sent=sent, ddp=ddp_bytes, mode=modes), f'{out}.{rank}')

@pytest.mark.parametrize('mode', ['ddp', 'no_sync'])
def test_ddp_two_ranks_equal_one_process(tmp_path, mode):
    "mode 'ddp': DDP reduces the dense gradients in backward, Grass the compact ones in step(); 'no_sync': Grass reduces everything."
    out = str(tmp_path/'w')
    _spawn(_ddp_worker, mode, out)
    r0, z = _check(out, *_reference())
    sent, ddp = r0['sent'], r0['ddp']
    if mode == 'ddp':
        assert r0['mode'] == 'slots'
        assert ddp == [z['dense']] * STEPS, ddp                     # DDP never sends a targeted weight
        assert sent[0] == 4 * z['n_tgt'] + z['tgt_full']             # step 0: every layer's first selection, from its full gradient
        assert min(sent[1:]) >= 4 * z['n_tgt'] + z['compact']
    else:
        assert r0['mode'] == 'all' and ddp == [0] * STEPS, ddp
        assert sent[0] == 4 * z['n'] + z['ddp'] and min(sent[1:]) >= 4 * z['n'] + z['dense'] + z['compact']
    total = [a + b for a, b in zip(sent, ddp)]
    assert all(t < z['ddp'] for t in total[1:]), (total, z)          # less than plain DDP after step 0
    print(f"{mode}: bytes all-reduced per step: DDP {ddp} + Grass {sent} = {total}; plain DDP {z['ddp']}")

def _acc_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), OMP_NUM_THREADS='1')
    torch.set_num_threads(1)
    from accelerate import Accelerator
    acc = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    try:
        assert acc.num_processes == world and dist.get_backend() == 'gloo'
        model, opt = _make()
        pmodel, popt = acc.prepare(model, opt)
        assert isinstance(pmodel, DDP)
        ddp_bytes, sent, norms = [], [], []
        pmodel.register_comm_hook(None, _counting_hook(ddp_bytes))
        for x in _data():
            ddp_bytes.append(0)
            for mb in x.chunk(world)[rank].chunk(ACCUM):
                with acc.accumulate(pmodel):
                    acc.backward(pmodel(input_ids=mb, labels=mb).loss)
                    if acc.sync_gradients: norms.append(float(opt.clip_grad_norm_(CLIP)))   # Grass-aware, after the all-reduce
                    popt.step(); popt.zero_grad()
            sent.append(opt.comm_bytes)
        torch.save(dict(state=acc.unwrap_model(pmodel).state_dict(), sent=sent, ddp=ddp_bytes, norms=norms), f'{out}.{rank}')
        del model, opt, pmodel, popt
    finally: acc.free_memory(); gc.collect(); dist.destroy_process_group()

def test_accelerate_two_ranks_equal_one_process(tmp_path):
    out = str(tmp_path/'a')
    _spawn(_acc_worker, out)
    ref, ropt = _reference(clip=CLIP)
    r0, z = _check(out, ref, ropt, rtol=1e-4, atol=2e-5)   # clipping by a norm summed in another order: a few Adam updates of near-zero gradients move by ~1e-6
    sent, ddp = r0['sent'], r0['ddp']
    assert len(r0['norms']) == STEPS and max(r0['norms']) > CLIP
    assert ddp == [z['dense']] * STEPS, ddp
    assert sent[0] == 4 * z['n_tgt'] + z['tgt_full'] and min(sent[1:]) >= 4 * z['n_tgt'] + z['compact']
    total = [a + b for a, b in zip(sent, ddp)]
    assert all(t < z['ddp'] for t in total[1:]), (total, z)
    print(f"accelerate: bytes all-reduced per step: DDP {ddp} + Grass {sent} = {total}; plain DDP {z['ddp']}")

def _misuse_worker(rank, world, port, case, out): _run(rank, world, port, _misuse_body, case, out)

def _misuse_body(rank, world, case, out):
    x = _data()[0].chunk(world)[rank]
    if case == 'unpatched':    # DDP still reduces a targeted weight
        model, opt = _make(); del model._ddp_params_and_buffers_to_ignore
        for p in model.parameters(): p.__dict__.pop('_ddp_ignored', None)
        ddp = DDP(model)
    else:                      # ranks seeded differently: DDP does not broadcast the ignored weights
        model, opt = _make(seed=rank); ddp = DDP(model)
    try:
        ddp(input_ids=x, labels=x).loss.backward(); opt.step(); msg = ''
    except RuntimeError as e: msg = str(e)
    Path(f'{out}.{rank}').write_text(msg)

@pytest.mark.parametrize('case,contains', [('unpatched', 'before wrapping'), ('seeds', 'differs across ranks')])
def test_ddp_misuse_is_loud(tmp_path, case, contains):
    out = str(tmp_path/'m')
    _spawn(_misuse_worker, case, out)
    for r in range(2): assert contains in Path(f'{out}.{r}').read_text()
