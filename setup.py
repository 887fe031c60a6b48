from setuptools import find_packages, setup

setup(
    name="hvd_qadam",
    version="0.1.0",
    description="Quantized Adam with error feedback: a communication-compression backend for Horovod and MPI",
    packages=find_packages(include=["hvd_qadam", "hvd_qadam.*"]),
    python_requires=">=3.9",
    # torch and horovod are installed by scripts/install.sh (CPU torch pin; horovod built from source).
    install_requires=["numpy", "scipy"],
    extras_require={
        "cpu": ["numba", "mpi4py", "tqdm", "matplotlib", "scikit-learn"],
        "gpu": ["cupy-cuda12x"],
        "test": ["pytest", "pytest-timeout"],
    },
)
