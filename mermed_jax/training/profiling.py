"""Profiler traces (config.profile) into the workdir, wherever it is.

jax.profiler writes its trace files through TensorFlow's file layer, which has no s3:// and cannot
be pointed at another GCS endpoint. So every trace is written to a local temporary folder and, when
it stops, copied into the workdir through data_pipelines.storage under the same relative names
(WORKDIR/plugins/profile/<run>/..., where TensorBoard's profile plugin looks), then deleted locally.
A local workdir takes the same path, so there is one way traces arrive. A copy that fails (a
storage outage past the storage layer's retries) is logged and does not stop training: the traces
stay in the local folder and are copied again, with the next trace's, after the next one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from clu import periodic_actions

from data_pipelines import storage


class WorkdirProfile(periodic_actions.Profile):
    """clu's periodic profiler hook, its traces copied into `workdir` after each one."""

    def __init__(self, workdir: str | os.PathLike, **kwargs):
        self._workdir = os.fspath(workdir)
        self._folder = tempfile.TemporaryDirectory(prefix="mermed-profile-")  # removed with the hook
        self._local = self._folder.name
        super().__init__(logdir=self._local, **kwargs)

    def _end_session(self, url: str | None) -> None:
        super()._end_session(url)
        try:
            written = storage.upload_tree(self._local, self._workdir)
        except OSError as e:  # storage.StorageError, naming the object, or a local file's error
            logging.warning("profile: traces not copied to %s (%s); kept in %s for the next copy",
                            self._workdir, storage.first_line(e), self._local)
            return
        shutil.rmtree(self._local)
        os.makedirs(self._local)
        logging.info("profile: %d trace files written to %s", len(written), self._workdir)


def profile_hook(workdir: str | os.PathLike, profile_config) -> WorkdirProfile:
    """The hook config.profile asks for: num_steps steps traced every every_steps steps."""
    return WorkdirProfile(workdir, num_profile_steps=profile_config.num_steps, every_steps=profile_config.every_steps,
                          first_profile=profile_config.every_steps, profile_duration_ms=None)
