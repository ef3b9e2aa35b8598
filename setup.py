from setuptools import setup

setup(
    name="chuantou",
    version="0.1.0",
    description="Pure-relay tunnel: reach a TCP or UDP service on another private network through one relay server",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Internet :: Proxy Servers",
    ],
    python_requires=">=3.10",
    packages=["common", "chuantou_server", "chuantou_client"],
    package_data={  # the admin pages: static HTML/CSS/JS served by the relay and the client
        "common": ["static/*"],
        "chuantou_server": ["static/*"],
        "chuantou_client": ["static/*"],
    },
    install_requires=[
        "websocket-client>=1.6",
        "simple-websocket>=1.0",
        "wsproto>=1.2",  # imported directly by the relay (simple-websocket is built on it)
        "h11>=0.14",  # parses the request heads on the relay port (wsproto is built on it)
        "platformdirs>=3.0",
        "cryptography>=41",  # sealed sessions: makes the key pair and self-signed certificate (ssl cannot)
        "prometheus-client>=0.17",  # /metrics: the text format, its escaping and metric types done right
    ],
    extras_require={
        "cluster": ["redis>=5"],  # python -m chuantou_server --cluster redis://... (a relay cluster)
        "test": ["pytest>=7", "pytest-timeout>=2.1", "selenium>=4.10", "mypy>=1.8", "redis>=5"],
    },
    entry_points={
        "console_scripts": [
            "cts=chuantou_server.__main__:main",
            "ctc=chuantou_client.__main__:main",
        ],
    },
)
