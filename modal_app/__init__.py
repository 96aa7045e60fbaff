"""gpubridge's Modal deployment: ComfyUI on Modal GPUs behind a job API.

``app.py`` is the deployable app (``modal deploy modal_app/app.py``); ``api.create_app`` is the job API as a
plain FastAPI app, served by Modal or by uvicorn (``python -m modal_app.serve``) over a backend from
``backends``. Importing the package imports neither Modal nor FastAPI.
"""
