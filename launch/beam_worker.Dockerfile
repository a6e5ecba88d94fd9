# Worker image for `python -m data_pipelines.convert ... --runner=beam` on Dataflow, Flink or Spark
# (docs/beam.md): Beam's own Python 3.13 SDK image, whose entrypoint the runners start, with the
# project and its pinned requirements installed, so the workers import the same code and versions
# as the launching machine, which must run Python 3.13 as well (the job graph is pickled). Build
# from the repository root:
#   docker build -f launch/beam_worker.Dockerfile -t IMAGE .
FROM apache/beam_python3.13_sdk:2.77.0
WORKDIR /opt/mermed
COPY requirements.txt requirements-beam.txt pyproject.toml README.md ./
RUN pip install --no-cache-dir -r requirements-beam.txt
COPY data_pipelines ./data_pipelines
COPY mermed_jax ./mermed_jax
RUN pip install --no-cache-dir --no-deps .
# The image's packages (Beam's own and the project's pins) must agree: fail the build, not the job.
RUN pip check
