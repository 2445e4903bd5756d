"""The application: what runs the recipe end to end on top of the library.

  configlib     the config fields, their defaults and one-sentence validation
  stages        the stage registry (pretrain, admm, retrain, scratch, inherited)
  context       what a run's stages share (config, data, devices, keys) and finished outputs
  trainer       the loop: epochs, evaluation, checkpoints, resume, the report
  train         the jitted adversarial train and eval steps
  data          Fashion-MNIST/MNIST IDX files and TFDS image datasets, batches via grain
  parallel      devices, meshes and hosts; checkpoint, workdir, reliability, reports,
                tensorboard_log: files, stops and logs of a run
  evaluate      AutoAttack-grade evaluation of a finished stage, with sanity checks
  study, study_report, plot   the paper's findings as one grid of runs, its report and plots
  export        the export command over a finished run (the compaction is the library's)
  cli, errors   the one command-line runner and the one user-error class
"""
