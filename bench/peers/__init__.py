"""The peers of bench/admission, each run as its own uvicorn process."""
