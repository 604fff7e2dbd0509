"""Tasks for tests/test_isolated.py that end every way a task can: a result, an exception, a real segfault, a hang."""
import ctypes
import os
import time


def square(task: dict) -> dict:
    if task.get("crash"):
        ctypes.string_at(0)  # reads address 0: SIGSEGV, as a vendor library's bug would
    if task.get("hang"):
        time.sleep(60)
    if task.get("fail"):
        raise ValueError(f"task {task['x']} is bad")
    return {"square": task["x"] ** 2, "pid": os.getpid()}
