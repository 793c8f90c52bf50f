"""The model repository: versions on disk (:mod:`.store`), import (:mod:`.importer`), and the
manager that loads, reloads and unloads them while the server runs (:mod:`.manager`)."""
