import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import shutil
import pytest

@pytest.fixture(scope='session')
def build_once(tmp_path_factory):
    "`build_once(name, build)`: a folder that `build(folder)` fills once per session, shared by pytest-xdist's workers."
    def once(name, build):
        if not os.environ.get('PYTEST_XDIST_WORKER'): d = tmp_path_factory.mktemp(name); build(d); return d
        from filelock import FileLock
        d = tmp_path_factory.getbasetemp().parent/name          # the workers' temp folders share this parent
        with FileLock(str(d) + '.lock'):
            if not (d/'.done').exists():
                shutil.rmtree(d, ignore_errors=True); d.mkdir(); build(d); (d/'.done').touch()
        return d
    return once
