"""The shared runtime every Tessera service uses (import the submodules you need)."""
