"""A run's lifecycle in this process: the compiled steps of a split (`hierarchy`) and of the baselines
(`baselines`), worker threads (`threads`) under one supervision (`supervisor`), checkpoints
(`checkpoint`) and the accuracy of both exits (`evaluate`)."""
