"""Import galleries as they come into the raybackfill table schemas: images (id, image, label) or texts
(id, text, label).

Image layouts: an ImageFolder tree (one subdirectory per class), the CIFAR-10/100 python pickles and the IDX
files of the MNIST family. Texts: JSONL, CSV or Parquet files. Rows are streamed into shards, so a large
source never has to fit in memory, and ids are deterministic (sorted paths, file order, or the source's own id
column), so a re-import gives the same ids.

A row that cannot be used (an image file that does not decode, an empty text) is not an error: it is left out
of the table and recorded in the quarantine table ``OUT/_quarantine`` (id, reason, stage ``import``), and the
import goes on. A source that is malformed as a whole (a JSONL line that is not JSON, duplicate ids, a pickle
that is not CIFAR) stops the import with an error that names the file and the line or row.

CIFAR pickles are read with an unpickler that only resolves the few numpy globals an array needs;
a pickle that asks for anything else (``os.system``...) is refused before it can run.
"""

from raybackfill.data.importers.cifar import cifar_files, import_cifar, load_cifar_pickle
from raybackfill.data.importers.common import QUARANTINE_DIR, DatasetImportError, ImportResult
from raybackfill.data.importers.folder import image_folder_files, import_image_folder
from raybackfill.data.importers.idx import idx_files, import_idx, read_idx
from raybackfill.data.importers.text import import_text

__all__ = [
    "QUARANTINE_DIR",
    "DatasetImportError",
    "ImportResult",
    "cifar_files",
    "idx_files",
    "image_folder_files",
    "import_cifar",
    "import_idx",
    "import_image_folder",
    "import_text",
    "load_cifar_pickle",
    "read_idx",
]
