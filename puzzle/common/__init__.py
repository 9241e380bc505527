"""Small helpers several stages share, one concept per module.

`atomic`: files and directories that appear under their name complete or not at all. `resources`: refusing Ray
requests the cluster cannot hold. `rows`: token rows from user data and the seeded order training reads them in.
"""
