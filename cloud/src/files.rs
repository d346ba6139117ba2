//! Secrets in the data directory: written whole, readable by the owner only.

use std::io::Write as _;
use std::path::Path;

use crate::error::{CloudError, Result};

/// Writes `bytes` to `path` through a temporary file and a rename, mode 0600 on Unix.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    let what = format!("writing {}", path.display());
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(CloudError::io(what.clone()))?;
    }
    let temporary = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&temporary)
        .map_err(CloudError::io(what.clone()))?;
    file.write_all(bytes)
        .map_err(CloudError::io(what.clone()))?;
    file.sync_all().map_err(CloudError::io(what.clone()))?;
    std::fs::rename(&temporary, path).map_err(CloudError::io(what))?;
    Ok(())
}
