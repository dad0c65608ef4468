"`scripts/train_tiny.sh` retrains the shipped weights: its two commands set exactly the parameters the shipped manifest records."
import ast, shlex
from pathlib import Path
from memnb import tiny
from memnb.cli import declared_params, find_experiment, parse_value

ROOT = Path(__file__).resolve().parents[1]
PATHS = {'init', 'out_dir'}   # folders: machine-specific, compared by what they hold (the hashes), not by name

def _given(cmd:str) -> dict:
    "The `-p name value` pairs of one `memnb run` command line."
    toks = shlex.split(cmd)
    return {toks[i + 1]: parse_value(toks[i + 2]) for i, t in enumerate(toks) if t == '-p'}

def _effective(given:dict) -> dict:
    "train_tiny's parameters with `given` on top of the notebook's defaults, folders left out."
    defaults = {k: ast.literal_eval(v) for k, (_, v) in declared_params(find_experiment('train_tiny')).items()}
    return {k: v for k, v in (defaults | given).items() if k not in PATHS}

def _script_commands() -> list:
    text = (ROOT/'scripts'/'train_tiny.sh').read_text().replace('\\\n', ' ')
    return [line.strip() for line in text.splitlines() if line.strip().startswith('memnb run train_tiny')]

def test_script_reproduces_the_shipped_commands():
    base_cmd, final_cmd = _script_commands()
    man = tiny.check_manifest(tiny.TINY_DIR)
    assert 'init' in man['info'], "the shipped weights record the run they went on from"
    assert _effective(_given(final_cmd)) == _effective(_given(man['command']))
    assert _effective(_given(base_cmd)) == _effective(_given(man['info']['init']['command']))
    assert _given(final_cmd)['init'] == '$out/base' and '-o "$out/base"' in base_cmd   # the second run starts from the first's weights
    minutes = _given(base_cmd)['minutes'] + _given(final_cmd)['minutes']
    assert minutes <= 90, f"the recipe takes {minutes} CPU minutes; the budget is 90"
