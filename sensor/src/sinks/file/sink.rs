//! The rotating JSON lines file and the sink writing to it.
//!
//! Each event is one line, written whole with one `write` to a file opened for appending.
//! When the next line would take the file past `max_file_bytes`, it is renamed to `PATH.1`
//! (`PATH.1` to `PATH.2` ...) and a new file started; `keep_files` rotated files are kept.
//! Shippers that follow by inode (all three do) read a rotated file to its end.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
};

use crate::{
    formats::{Format, Record},
    sinks::{
        error::SinkError,
        sink::{Delivered, Failed, Sink},
    },
};

pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: Option<(File, u64)>,
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl RotatingFile {
    pub fn new(path: &Path, max_bytes: u64, keep: usize) -> Self {
        Self {
            path: path.to_owned(),
            max_bytes,
            keep,
            file: None,
        }
    }

    pub fn open(&mut self) -> Result<(), SinkError> {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir)
                .map_err(|e| SinkError::io(format!("creating {}", dir.display()), e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| SinkError::io(format!("opening {}", self.path.display()), e))?;
        let size = file
            .metadata()
            .map_err(|e| SinkError::io(format!("reading {}", self.path.display()), e))?
            .len();
        self.file = Some((file, size));
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), SinkError> {
        self.file = None;
        let _ = fs::remove_file(rotated(&self.path, self.keep));
        for n in (1..self.keep).rev() {
            let from = rotated(&self.path, n);
            if from.exists() {
                fs::rename(&from, rotated(&self.path, n + 1))
                    .map_err(|e| SinkError::io(format!("rotating {}", from.display()), e))?;
            }
        }
        fs::rename(&self.path, rotated(&self.path, 1))
            .map_err(|e| SinkError::io(format!("rotating {}", self.path.display()), e))?;
        self.open()
    }

    /// Appends one line (a newline is added).
    pub fn write_line(&mut self, line: &str) -> Result<(), SinkError> {
        if self.file.is_none() {
            self.open()?;
        }
        let len = line.len() as u64 + 1;
        if self
            .file
            .as_ref()
            .is_some_and(|(_, size)| *size > 0 && size + len > self.max_bytes)
        {
            self.rotate()?;
        }
        let Some((file, size)) = self.file.as_mut() else {
            return Err(SinkError::Protocol("file not open".into()));
        };
        let mut buf = String::with_capacity(line.len() + 1);
        buf.push_str(line);
        buf.push('\n');
        if let Err(e) = file.write_all(buf.as_bytes()) {
            // Cut a partial line (a full disk): it would merge with the next one. Reopen next
            // time (the file may have been removed).
            let _ = file.set_len(*size);
            self.file = None;
            return Err(SinkError::io(format!("writing {}", self.path.display()), e));
        }
        *size += len;
        Ok(())
    }
}

pub struct FileSink {
    file: RotatingFile,
    format: Box<dyn Format>,
    batch: usize,
}

impl FileSink {
    pub fn new(file: RotatingFile, format: Box<dyn Format>, batch: usize) -> Self {
        Self {
            file,
            format,
            batch,
        }
    }
}

impl Sink for FileSink {
    type Item = Record;

    fn target(&self) -> String {
        self.file.path.display().to_string()
    }

    fn batch_max(&self) -> usize {
        self.batch
    }

    async fn deliver(&mut self, batch: &[Record]) -> Result<Delivered, Failed> {
        for (i, rec) in batch.iter().enumerate() {
            let line = self.format.format(rec);
            if let Err(e) = self.file.write_line(&line) {
                return Err(Failed::after(i, e));
            }
        }
        Ok(Delivered::all(batch.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n() {
        let dir = std::env::temp_dir().join(format!("sensor-rotate-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("out.jsonl");
        let mut f = RotatingFile::new(&path, 25, 2);
        for i in 0..7 {
            f.write_line(&format!("line-{i}-xxxxxx")).expect("write"); // 16 bytes with \n
        }
        // One line per file: current has line-6, .1 line-5, .2 line-4; older ones are gone.
        let read = |p: PathBuf| fs::read_to_string(p).expect("read");
        assert_eq!(read(path.clone()), "line-6-xxxxxx\n");
        assert_eq!(read(rotated(&path, 1)), "line-5-xxxxxx\n");
        assert_eq!(read(rotated(&path, 2)), "line-4-xxxxxx\n");
        assert!(!rotated(&path, 3).exists());
        // A reopened file continues with its size.
        let mut f = RotatingFile::new(&path, 40, 2);
        f.write_line("a").expect("write");
        assert_eq!(read(path.clone()), "line-6-xxxxxx\na\n");
        let _ = fs::remove_dir_all(&dir);
    }
}
