"""What the tests, benchmarks, studies and examples of this repository share (not part of the
installed hvd_qadam package: it needs scikit-learn, and it is no library API):

    digits        scikit-learn's digits and the MLP trained on them (the demo's task)
    lm            a byte-level Transformer LM and its corpus (the Python standard library's source)
    launch        launching programs on real ranks of this host (mpirun, horovodrun)
    study_output  how studies and benchmarks write their results (JSON, figures)

Import it from the repository's root: the tests put the root on ``sys.path`` (tests/conftest.py;
launched programs get it on PYTHONPATH from ``launch.job_env``), and the scripts of bench/,
studies/ and examples/ put their parent folder there.
"""
