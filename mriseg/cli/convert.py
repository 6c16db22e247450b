"""``mriseg convert``: parse the options, call :mod:`mriseg.convert`, print where it went."""

from __future__ import annotations

from typing import Optional

import typer

from mriseg.cli.common import app, examples, print_json


@app.command("convert", epilog=examples(
    "mriseg convert ../shared/data/brats nnUNet_raw --dataset-id 501 --name BraTS2013 "
    "--modalities flair=Flair_subtrMeanDivStd,t1ce=T1c_subtrMeanDivStd,seg=OTMultiClass",
    "mriseg convert kaggle_3m nnUNet_raw --dataset-id 502 --name LGG --dims 2",
    "mriseg convert BraTS2021_Training nnUNet_raw --dataset-id 503 --name BraTS2021 --label-map 4:3"))
def convert_command(
    source: str = typer.Argument(..., help="Dataset folder in any layout mriseg reads."),
    out: str = typer.Argument(..., help="Folder to write DatasetNNN_NAME into (e.g. $nnUNet_raw)."),
    to: str = typer.Option("nnunet", "--to", help="Target format: nnunet (nnU-Net v2 raw)."),
    dataset_id: int = typer.Option(..., "--dataset-id", help="nnU-Net dataset number, 1-999."),
    name: str = typer.Option(..., "--name", help="Dataset name (letters, digits, _ and -)."),
    layout: Optional[str] = typer.Option(None, "--layout", help="lgg | brats | msd | pairs (detected when omitted)."),
    modalities: Optional[str] = typer.Option(None, "--modalities", help="BraTS file-name map, as for preprocess."),
    label_map: Optional[str] = typer.Option(None, "--label-map",
                                            help="Replace label values, e.g. 4:3 (nnU-Net needs consecutive labels)."),
    dims: int = typer.Option(3, "--dims", help="3: one case per volume; 2: one case per slice (kaggle_3m)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing DatasetNNN_NAME."),
    as_json: bool = typer.Option(False, "--json", help="Print the dataset.json written on stdout."),
) -> None:
    """Write an nnU-Net v2 raw dataset (imagesTr/, labelsTr/, imagesTs/, dataset.json) from SOURCE."""
    import json

    from mriseg.convert import check_nnunet_dataset, convert_to_nnunet
    from mriseg.data.preprocess import parse_label_map
    from mriseg.errors import MrisegError

    if to != "nnunet":
        raise MrisegError(f"--to {to!r}: the one target format is nnunet")
    root = convert_to_nnunet(source, out, dataset_id, name, layout=layout, modalities=modalities,
                             label_map=parse_label_map(label_map), dims=dims, overwrite=overwrite)
    check_nnunet_dataset(root)  # nnU-Net's own rules, on what was written
    if as_json:
        print_json(json.loads((root / "dataset.json").read_text()))
