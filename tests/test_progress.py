"""One progress convention for every command: log lines off a terminal, each tenth once."""

import logging

from megdet.logs import Progress, setup_logging


def test_off_a_terminal_progress_is_a_log_line_per_tenth_and_the_end_once(caplog):
    setup_logging()
    logger = logging.getLogger("megdet")
    logger.propagate = True  # let caplog see the lines
    try:
        with caplog.at_level(logging.INFO, logger="megdet"):
            progress = Progress(25, "image", "predict", bar=False)
            for count in (1, 2, 3, 10, 4, 5):  # 25 in all, in uneven batches
                progress.update(count)
            progress.close()
    finally:
        logger.propagate = False
    lines = [r.getMessage() for r in caplog.records]
    # a tenth of 25 is 3 (rounded up): a line at or past 3, 6, 9, ... and one at 25
    assert lines == [f"predict: {n}/25 images" for n in (3, 6, 16, 20, 25)]
