"""A training run: everything checked before a process group exists (`prepare`), the parts built from it
(`setup`: process group, model, engine, loader, sinks, restore), and the loop itself (`loop`); and
`dstrain train --dry-run`, the same preparation reported instead of run (`plan`, `dry_run`)."""
