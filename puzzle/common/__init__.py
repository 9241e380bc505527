"""Small helpers several stages share, one concept per module.

`atomic`: files and directories that appear under their name complete or not at all. `resources`: refusing Ray
requests the cluster cannot hold. `rows`: token rows from user data and the seeded order training reads them in.
`schedule`: the learning-rate schedule of every training loop. `checkpoint`: tensor checkpoint files (a state dict
and a JSON record). `memory`: a stage's peak memory over the driver's process tree.
"""
