"""lipsync_trt: SyncTalk_2D lip-sync inference (WAV -> MP4, Python API, streaming server), fast on every backend."""
from setuptools import find_packages, setup

VERSION = {}
exec(open("lipsync_trt/version.py", encoding="utf-8").read(), VERSION)   # one version, without importing the package

setup(
    name="lipsync_trt",
    version=VERSION["__version__"],
    description="Fast SyncTalk_2D lip-sync inference: PyTorch, ONNX Runtime, TensorRT and Core ML backends",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lipsync_trt", "lipsync_trt.*"]) + ["lipsync_trt.kernels"],
    package_dir={"lipsync_trt.kernels": "kernels"},
    package_data={"lipsync_trt": ["serve/static/*"], "lipsync_trt.kernels": ["README.md"]},
    install_requires=[
        "torch>=2.2",
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        "soundfile>=0.12",
        "soxr>=0.3",
        "av>=12",
        "tqdm>=4.60",
    ],
    extras_require={
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18"],
        "tensorrt": ["onnx>=1.16", "tensorrt>=10"],
        "coreml": ["coremltools>=8.0"],
        "gpu": ["triton>=3.0"],
        "serve": ["aiohttp>=3.14.4", "prometheus_client>=0.17"],   # /metrics: prometheus_client, imported when asked
        "ray": ["ray[serve]>=2.9"],                         # batch --ray, serve --ray (docs/SCALING.md)
        "webrtc": ["aiohttp>=3.14.4", "aiortc>=1.9"],      # serve --webrtc (docs/LIVE.md)
        "compare": ["scikit-image>=0.19"],                 # SSIM in `python -m lipsync_trt compare`
        "pipecat": ["pipecat-ai>=0.0.107"],                # lipsync_trt.pipecat: the Pipecat video service
        "dev": [
            "pytest>=8",
            "librosa>=0.10",
            "onnx>=1.16",
            "onnxruntime>=1.18",
            "aiohttp>=3.14.4",                             # keepalive_timeout closes never-used connections
            "prometheus_client>=0.17",                     # /metrics test (its text parser as the oracle)
            "ray[serve]>=2.9",                             # the Ray batch and Ray Serve tests (local Ray, CPU)
            "matplotlib>=3.7",
            "scikit-image>=0.19",
            "playwright>=1.40",                            # browser-client test, with the system chromium
            "pipecat-ai>=0.0.107",                         # tests/test_pipecat.py (Pipecat's run_test)
            "aiortc>=1.9",                                 # serve --webrtc tests (an aiortc client)
            "coremltools>=8.0; platform_system != 'Windows'",   # Core ML conversion round trip (runs on Linux)
            "triton>=3.0; platform_system == 'Linux'",   # kernel tests run under TRITON_INTERPRET=1 on CPU
        ],
    },
    entry_points={"console_scripts": ["lipsync-trt=lipsync_trt.__main__:main"]},
)
